"""NVIDIA apex's fused AdamW and LayerNorm (``optim.impl``), used only where apex imports. apex is built from source
(github.com/NVIDIA/apex, with its CUDA extensions); the PyPI package named ``apex`` is an unrelated project and is
never a dependency.

- ``auto`` (default): apex where ``apex.optimizers.FusedAdam`` imports and the device is CUDA, else torch's fused
  AdamW (which this CPU runs);
- ``apex``: apex, or a one-line error before any process group when it does not import;
- ``torch``: torch's.

With apex, the optimizer is ``FusedAdam(adam_w_mode=True)`` and every ``nn.LayerNorm`` of the trained modules becomes
``apex.normalization.FusedLayerNorm`` (same parameters and names). FusedAdam has no device-side skip flag, so a
step's "apply or skip" decision (train/engine.py) is read on the host before it steps: one sync per step on this
path. Not exercised on this project's CPU machines (apex needs CUDA to build its kernels): only the refusal is
tested here.
"""
from __future__ import annotations

import torch
from torch import nn

from difftrain.config import ConfigError


def importable() -> bool:
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:  # ImportError, or apex's own import-time errors without its CUDA extensions
        return False
    return True


def check(setting: str) -> None:
    """Config-time: ``apex`` needs apex to import."""
    if setting == "apex" and not importable():
        raise ConfigError("config key 'optim.impl' = apex: NVIDIA apex is not importable here (apex.optimizers."
                          "FusedAdam); build it from source (github.com/NVIDIA/apex), the PyPI 'apex' is unrelated")


def wanted(setting: str, device: torch.device) -> bool:
    if setting == "torch":
        return False
    return importable() and (setting == "apex" or device.type == "cuda")


def fused_adamw(params: list, lr: float, betas: tuple, eps: float, weight_decay: float):
    from apex.optimizers import FusedAdam

    return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)


def fuse_norms(module: nn.Module) -> None:
    """Each ``nn.LayerNorm`` -> ``FusedLayerNorm`` with the same shape, eps, affine flag and parameters."""
    from apex.normalization import FusedLayerNorm

    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.LayerNorm:
                fused = FusedLayerNorm(sub.normalized_shape, eps=sub.eps, elementwise_affine=sub.elementwise_affine)
                fused.load_state_dict(sub.state_dict())
                setattr(child, attr, fused.to(next(iter(sub.parameters()), torch.empty(0)).device))
