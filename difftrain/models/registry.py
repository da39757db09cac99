"""Model registry: named sizes -> architecture kwargs; build on the meta device; our own weights format.

Every architecture class has a ``config_class`` dataclass (accepting at least ``image_size``,
``in_channels``, ``num_classes`` and ``text_dim``), is built as ``cls(config)``, exposes its trunk
as ``self.blocks`` (an ``nn.ModuleList``), does all initialisation in ``init_weights()`` and is called
``model(x_t, t, cond)`` with continuous ``t`` in [0, 1] (1 = noise).

Video models share the image names: ``model.frames > 0`` selects the architecture's video form
(``VIDEO_FORMS``), e.g. ``model.name=DiT-T/2 model.frames=8 model.attention=factorized``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from difftrain.config import ConfigError, ModelConfig

ARCHS = {
    "dit": "difftrain.models.dit:DiT",
    "dit_video": "difftrain.models.dit_video:VideoDiT",
    "unet": "difftrain.models.unet:UNet",
}
VIDEO_FORMS = {"dit": "dit_video"}  # image architecture -> its video form (model.frames > 0)

# DiT sizes (Peebles & Xie 2023, Table 1) x patch 2/4/8, plus a tiny one for CPU demos and tests.
_DIT_SIZES = {
    "T": dict(depth=4, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
MODELS: dict[str, tuple[str, dict]] = {
    f"DiT-{size}/{p}": ("dit", dict(kw, patch_size=p)) for size, kw in _DIT_SIZES.items() for p in (2, 4, 8)
}
MODELS.update({
    "UNet-T": ("unet", dict(block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=8)),
    "UNet-S": ("unet", dict(block_out_channels=[128, 256, 256], layers_per_block=2, attention_head_dim=8)),
})


def arch_class(arch: str) -> type[nn.Module]:
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture '{arch}'; known: {', '.join(ARCHS)}")
    mod, name = ARCHS[arch].split(":")
    return getattr(importlib.import_module(mod), name)


def arch_config(mcfg: ModelConfig, text_dim: int = 0):
    """The architecture dataclass for a run's model section (registry size + ``model.args``)."""
    if mcfg.name not in MODELS:
        raise ConfigError(f"config key 'model.name' = {mcfg.name!r} is not one of: {', '.join(MODELS)}")
    arch, kwargs = MODELS[mcfg.name]
    section = dict(  # set from the model section (and the text encoder), never from model.args
        image_size=mcfg.image_size,
        in_channels=mcfg.in_channels,
        num_classes=mcfg.num_classes if mcfg.cond == "class" else 0,
        text_dim=text_dim if mcfg.cond == "text" else 0,
    )
    if mcfg.frames < 0:
        raise ConfigError(f"config key 'model.frames' = {mcfg.frames} must be >= 0 (0 = image model)")
    if mcfg.frames > 0:
        if arch not in VIDEO_FORMS:
            video = [n for n, (a, _) in MODELS.items() if a in VIDEO_FORMS]
            raise ConfigError(f"config key 'model.frames' = {mcfg.frames}: model '{mcfg.name}' has no video form; "
                              f"video models: {', '.join(video)}")
        arch = VIDEO_FORMS[arch]
        section.update(frames=mcfg.frames, temporal_patch=mcfg.temporal_patch, attention=mcfg.attention)
    else:
        for key, image_value in (("temporal_patch", 1), ("attention", "full")):
            if getattr(mcfg, key) != image_value:
                raise ConfigError(f"config key 'model.{key}' = {getattr(mcfg, key)!r} applies to video models only "
                                  "(set model.frames > 0)")
    ccls = arch_class(arch).config_class
    kwargs = dict(kwargs)
    valid = {f.name for f in dataclasses.fields(ccls)}
    for k, v in mcfg.args.items():
        if k in section:
            raise ConfigError(f"config key 'model.args.{k}' is set from the model section "
                              f"({'the text encoder' if k == 'text_dim' else f'model.{k}'}); remove it from model.args")
        if k not in valid:
            raise ConfigError(f"unknown config key 'model.args.{k}' for {arch}; "
                              f"valid: {', '.join(sorted(valid - section.keys()))}")
        kwargs[k] = v
    kwargs.update(section)
    return arch, ccls(**kwargs)


def build(arch: str, config, device: str | torch.device = "meta") -> nn.Module:
    """Build on ``device`` (meta by default: no memory, no init; call ``materialize`` next)."""
    with torch.device(device):
        return arch_class(arch)(config)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate a meta-built model on ``device`` and run its ``init_weights`` under ``seed``."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    return model


# --------------------------------------------------------------------------- our weights format
def save_pretrained(model: nn.Module, state: dict[str, torch.Tensor], out_dir: str | Path) -> None:
    """``config.json`` (architecture) + ``model.safetensors`` (given state, e.g. EMA weights)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"_difftrain_arch": _arch_name(model), **dataclasses.asdict(model.config)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load what ``save_pretrained`` wrote (safetensors only: nothing is unpickled)."""
    from difftrain.models.diffusers_folder import load_safetensors

    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"'{p}' is not a difftrain model folder (config.json + model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.pop("_difftrain_arch", None)
    if arch is None:
        raise ValueError(f"'{cfg_file}' has no _difftrain_arch: not a difftrain export")
    cls = arch_class(arch)
    model = materialize(build(arch, cls.config_class(**cfg)), device, seed=0)  # buffers get initialised too
    state = load_safetensors(p / "model.safetensors", device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"'{p}': weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _arch_name(model: nn.Module) -> str:
    for arch, target in ARCHS.items():
        mod, name = target.split(":")
        if type(model).__name__ == name and type(model).__module__ == mod:
            return arch
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
