"""Build what a run needs from its config: frozen encoders, the backbone, weights-only init.

Shared by training, sampling and export so there is one way to turn a run into modules.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from difftrain.config import Config, ConfigError
from difftrain.models import registry


def build_encoders(cfg: Config, device: torch.device):
    """(text encoder or None, VAE or pixel space), frozen, on ``device``."""
    from difftrain.models.encoders import TextEncoder, build_vae

    text = None
    if cfg.model.cond == "text":
        text = TextEncoder.from_pretrained(cfg.encoders.text, max_length=cfg.encoders.text_max_length,
                                           cache_size=cfg.encoders.text_cache).to(device)
    vae = build_vae(cfg.encoders.vae, channels=cfg.data.channels).to(device)
    return text, vae


def model_config(cfg: Config, text_dim: int, latent_channels: int | None):
    arch, acfg = registry.arch_config(cfg.model, text_dim)
    if latent_channels is not None and acfg.in_channels != latent_channels:
        raise ConfigError(f"config key 'model.in_channels' = {acfg.in_channels} but the "
                          f"{'VAE latents' if cfg.encoders.vae else 'images'} have {latent_channels} channels")
    return arch, acfg


def build_backbone(cfg: Config, arch: str, acfg, device: torch.device) -> nn.Module:
    """Meta build -> materialise on ``device`` with ``init_weights`` under the run seed -> init_from."""
    model = registry.materialize(registry.build(arch, acfg), device, seed=cfg.run.seed)
    if cfg.init_from:
        load_weights_only(model, cfg.init_from)
    return model


def check_init_from(path: str) -> None:
    """Check config key ``init_from`` without reading a tensor (cheap enough for config validation): a folder with a
    readable ``config.json`` naming our export (``_difftrain_arch``) or a diffusers class (``_class_name``), and a
    sound header in every safetensors file it would load (a truncated or garbage file fails here). ``ConfigError``
    naming the file; that the weights fit the run's model is checked when they load (:func:`load_weights_only`)."""
    _init_from_files(path)


def _init_from_files(path: str) -> tuple[dict, list[Path]]:
    """(config.json, the safetensors files, headers checked) of an ``init_from`` folder, or ``ConfigError``."""
    from difftrain.models.diffusers_folder import check_safetensors, read_json, weight_files

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"config key 'init_from' = '{path}' is not a folder")
    if not (p / "config.json").is_file():
        raise ConfigError(f"config key 'init_from' = '{path}' has no config.json")
    try:
        meta = read_json(p / "config.json", what="a model folder")
        if "_difftrain_arch" in meta:
            if not (p / "model.safetensors").is_file():
                raise ValueError("it has no model.safetensors")
            files = [p / "model.safetensors"]
        elif "_class_name" in meta:
            files = weight_files(p)
        else:
            raise ValueError("it is neither a difftrain nor a diffusers model folder")
        for f in files:
            check_safetensors(f)
    except ValueError as e:
        raise ConfigError(f"config key 'init_from' = '{path}': {e}") from None
    return meta, files


def load_weights_only(model: nn.Module, path: str) -> None:
    """``init_from``: our export (config.json with _difftrain_arch + model.safetensors) or a diffusers
    model folder (``model.load_diffusers``). Weights only: never optimizer state, step or data position
    (that is resume). Every key and shape must match the model; the resolution may differ. Safetensors and JSON
    only (nothing is unpickled); an unreadable file is a ``ConfigError`` naming it."""
    from difftrain.models.diffusers_folder import load_safetensors

    meta, files = _init_from_files(path)
    try:
        if "_difftrain_arch" in meta:
            arch = meta["_difftrain_arch"]
            if type(model) is not registry.arch_class(arch):  # exact: a video DiT is a DiT subclass
                raise ValueError(f"it holds a '{arch}' model, but the run builds a {type(model).__name__}")
            state = load_safetensors(files[0])
        else:
            state = model.load_diffusers(Path(path))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"config key 'init_from' = '{path}': {e}") from None
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ConfigError(f"config key 'init_from' = '{path}' does not match the model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise ConfigError(f"config key 'init_from' = '{path}': '{k}' has shape {tuple(state[k].shape)}, "
                              f"but the model's is {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def write_model_config(arch: str, acfg, run_dir: Path) -> None:
    d = run_dir / "model"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"_difftrain_arch": arch, **dataclasses.asdict(acfg)}, indent=2))


def read_model_config(run_dir: Path):
    f = Path(run_dir) / "model" / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a difftrain run dir (no model/config.json)")
    meta = json.loads(f.read_text())
    arch = meta.pop("_difftrain_arch")
    return arch, registry.arch_class(arch).config_class(**meta)


def load_run_weights(run_dir: Path, model: nn.Module, which: str = "ema") -> int:
    """Load a run's newest complete checkpoint into a plain single-process ``model`` (any world size
    wrote it). ``which="ema"`` overlays the EMA parameters on the saved model state. Returns the step.
    A corrupt newest checkpoint is named in a warning and the previous complete one is used
    (``checkpoint.resume_newest``); ``CheckpointError`` when none loads."""
    from difftrain.train.checkpoint import CheckpointError, resume_newest

    tensors = {"model": {k: v.detach() for k, v in model.state_dict().items()}}
    if which == "ema":
        tensors["ema"] = {n: torch.empty_like(p) for n, p in model.named_parameters()}
    found = resume_newest(Path(run_dir) / "checkpoints", tensors)
    if found is None:
        raise CheckpointError(f"'{run_dir}' has no complete checkpoint")
    if which == "ema":
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(tensors["ema"][n])
    return found[1]["step"]
