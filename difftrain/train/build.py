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


def _saved_keys(ckpt_root: Path, step, served: str | None) -> set[str]:
    """The served module's state-dict keys in the checkpoint of ``step`` (its DCP metadata, read safely)."""
    from difftrain.train.checkpoint import read_metadata, step_dir

    prefix = f"model.{served}." if served else "model."
    md = read_metadata(step_dir(ckpt_root, int(step)) / ".metadata")
    return {k[len(prefix):] for k in md.state_dict_metadata if k.startswith(prefix)}


def load_run_weights(run_dir: Path, model: nn.Module, which: str = "ema") -> int:
    """Load a run's newest complete checkpoint's served module (``train_state["served"]``) into ``model``, plain or
    sharded (DCP reads into its tensors, any world size wrote it). ``which="ema"`` overlays the EMA parameters on
    the saved module state. Returns the step. A corrupt newest checkpoint is named in a warning and the previous
    complete one is used (``checkpoint.resume_newest``); ``CheckpointError`` when none loads."""
    from difftrain.train.checkpoint import CheckpointError, resume_newest

    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes

    tensors: dict = {}
    own = {k: v.detach() for k, v in model.state_dict().items()}
    ema = {n: torch.empty_like(p) for n, p in model.named_parameters()} if which == "ema" else None
    changes: list = []
    grads: dict = {}  # requires_grad of the plain module's parameters, restored after the merge

    def layout(state: dict) -> None:  # the checkpoint's own layout, known once its train state is read
        nonlocal own, ema, changes
        served = state.get("served")
        tensors.clear()
        adapt = (state.get("config") or {}).get("adapt") or []
        if adapt and not changes:  # a run with model changes: its module as trained, merged after the load
            if any(isinstance(p, DTensor) for p in model.parameters()):
                raise ValueError(f"'{run_dir}' was trained with model changes (adapt); it is read into a whole "
                                 "module, then merged, not into a sharded one")
            changes = changes_of(SimpleNamespace(adapt=adapt))
            grads.update({n: p.requires_grad for n, p in model.named_parameters()})
            apply_changes(model, changes, 0)  # every new tensor is read from the checkpoint
            own = {k: v.detach() for k, v in model.state_dict().items()}
            if which == "ema":  # the EMA covers what was trained: the adapters
                ema = {n: torch.empty_like(p) for n, p in model.named_parameters() if p.requires_grad}
        saved = _saved_keys(Path(run_dir) / "checkpoints", state.get("step"), served)
        for d in (own, ema or {}):  # weights of the model without an optional flag: those keys keep their init
            for k in [k for k in d if _optional(model, k) and k not in saved]:
                del d[k]
        if served is None:  # written before stages owned their modules: one flat module
            tensors.update({"model": own, **({"ema": ema} if ema is not None else {})})
        else:
            tensors.update({"model": {served: own}, **({"ema": {served: ema}} if ema is not None else {})})

    found = resume_newest(Path(run_dir) / "checkpoints", tensors, before_load=layout)
    if found is None:
        raise CheckpointError(f"'{run_dir}' has no complete checkpoint")
    if ema is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ema:  # not an optional key the checkpoint lacks
                    p.copy_(ema[n])
    if changes:
        merge_changes(model, changes)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    return found[1]["step"]
