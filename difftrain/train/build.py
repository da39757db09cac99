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
    """(text encoder or None, VAE or pixel space), frozen, on ``device`` (:func:`models.encoders.build_encoders`)."""
    from difftrain.models import encoders

    return encoders.build_encoders(cfg.encoders, cfg.model.cond, cfg.data.channels, device)


def model_config(cfg: Config, text_dim: int, latent_channels: int | None):
    arch, acfg = registry.arch_config(cfg.model, text_dim)
    if latent_channels is not None and acfg.in_channels != latent_channels:
        raise ConfigError(f"config key 'model.in_channels' = {acfg.in_channels} but the "
                          f"{'VAE latents' if cfg.encoders.vae else 'images'} have {latent_channels} channels")
    return arch, acfg


@dataclasses.dataclass
class Shared:
    """What every stage of a run shares, built before the stage: the device and meshes, the frozen encoders (VAE,
    text), the diffusion, the conditioner and the run's backbone architecture (``arch``, ``acfg``)."""
    cfg: Config
    device: torch.device
    meshes: object | None  # difftrain.parallelism.dims.Meshes; None outside a training run
    text: nn.Module | None
    vae: nn.Module
    diffusion: object
    conditioner: object
    arch: str
    acfg: object

    def backbone_spec(self, source=None, role: str = "trainable"):
        """A module of the run's architecture: seeded init then ``source`` (trainable), or ``source``'s weights
        (frozen)."""
        from difftrain.train.stages.base import ModuleSpec

        return ModuleSpec(role, meta=lambda: registry.build(self.arch, self.acfg), source=source,
                          init=lambda device: build_backbone(self.arch, self.acfg, device, self.cfg.run.seed, source))

    @classmethod
    def parts(cls, cfg: Config, device: torch.device, *, diffusion=None, conditioner=None, vae=None, text=None,
              arch: str | None = None, acfg=None) -> "Shared":
        """Shared parts given piece by piece (tests, tools): what is not given is None."""
        return cls(cfg, device, None, text, vae, diffusion, conditioner, arch, acfg)


def build_shared(cfg: Config, device: torch.device, meshes=None) -> Shared:
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models.conditioner import Conditioner

    text, vae = build_encoders(cfg, device)
    arch, acfg = model_config(cfg, text.dim if text is not None else 0, vae.latent_channels)
    null_text = None
    if cfg.data.kind == "latent":  # pre-encoded shards: check their encoders match this run's
        from difftrain.data.latents import load_latent_data

        null_text = load_latent_data(cfg.data, cfg.encoders, cfg.model.cond, text, vae).null_text
    diffusion = build_diffusion(cfg.diffusion, pixel_space=not cfg.encoders.vae)
    conditioner = Conditioner(cfg.model, text, device, null_text=null_text,
                              guidance_input=getattr(acfg, "guidance_embed", False))
    return Shared(cfg, device, meshes, text, vae, diffusion, conditioner, arch, acfg)


def build_backbone(arch: str, acfg, device: torch.device, seed: int, source=None) -> nn.Module:
    """Meta build -> materialise on ``device`` with ``init_weights`` under ``seed`` -> ``source``'s weights (a
    ``train.sources.Source``: ``init_from``), when given."""
    model = registry.materialize(registry.build(arch, acfg), device, seed=seed)
    if source is not None:
        source.load(model)
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
    expected = {k: v for k, v in model.state_dict().items() if k in state or not _optional(model, k)}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ConfigError(f"config key 'init_from' = '{path}' does not match the model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise ConfigError(f"config key 'init_from' = '{path}': '{k}' has shape {tuple(state[k].shape)}, "
                              f"but the model's is {tuple(v.shape)}")
    model.load_state_dict(state, strict=len(expected) == len(model.state_dict()))


def _optional(model: nn.Module, key: str) -> bool:
    """A parameter an architecture flag adds with a zero init (``optional_keys``: the guidance-scale input), which
    weights of the same model without the flag lack: it keeps its init."""
    return key.startswith(tuple(getattr(model, "optional_keys", ())))


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


