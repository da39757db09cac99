"""Classifier-free guidance (Ho & Salimans 2022).

Convention: ``w`` is the guidance *scale* as in Imagen / Stable Diffusion / diffusers:

    out = uncond + w·(cond − uncond)        w = 1: conditional model, w = 0: unconditional

Ho & Salimans 2022 (eq. 6) and Meng et al. 2023 write ε̃ = (1 + w')·ε_c − w'·ε_u instead; their
w' is our w − 1. Our default sample guidance 3.0 is their w' = 2.

Guidance may be applied to any prediction kind (eps, v, x, velocity): the conversion to x̂0 is
affine in the prediction with the same coefficients for both branches, so combining predictions
and then converting equals converting and then combining.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, w) -> torch.Tensor:
    """uncond + w·(cond − uncond). ``w`` is a float or a per-sample tensor [B].

    Uses ``torch.lerp``, which returns ``cond_out`` exactly at w = 1 and ``uncond_out`` exactly at
    w = 0 (it switches between start + w·Δ and end − (1 − w)·Δ at w = ½).
    """
    if isinstance(w, (int, float)):
        if w == 1:
            return cond_out
        if w == 0:
            return uncond_out
        return torch.lerp(uncond_out, cond_out, float(w))
    w = torch.as_tensor(w, device=cond_out.device, dtype=cond_out.dtype)
    w = w.reshape(w.shape + (1,) * (cond_out.ndim - w.ndim))
    return torch.lerp(uncond_out, cond_out, w)


def _cat_cond(cond: Any, uncond: Any, batch: int) -> Any:
    """Concatenate a condition with its null condition along the batch dimension.

    Tensors are concatenated (an unconditional entry with batch 1 is expanded to ``batch``);
    dicts recursively; anything else (None, a float guidance scale, ...) must be equal in both.
    """
    if isinstance(cond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond have different keys: {sorted(cond)} vs {sorted(uncond)}")
        return {k: _cat_cond(cond[k], uncond[k], batch) for k in cond}
    if torch.is_tensor(cond):
        if cond.shape[0] == 1 and batch > 1:
            cond = cond.expand(batch, *cond.shape[1:])
        if uncond.shape[0] == 1 and batch > 1:
            uncond = uncond.expand(batch, *uncond.shape[1:])
        return torch.cat([cond, uncond.to(cond.dtype)], dim=0)
    if cond != uncond:
        raise ValueError(f"non-tensor condition entries must match, got {cond!r} vs {uncond!r}")
    return cond


def guided_denoiser(
    model_fn: Callable,
    cond: Any,
    uncond: Any,
    w,
    *,
    to_x0: Callable | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Build ``fn(x, t) -> guided output`` for ``model_fn(x_t, t, cond) -> prediction``.

    Conditional and unconditional branches run in ONE forward on the concatenated batch [2B].
    At w = 1 the unconditional branch is skipped. With ``to_x0`` (e.g.
    ``Diffusion.x0_from_pred``, called as ``to_x0(pred, x, t)``) the result is the data prediction
    x̂0 that samplers need; without it, the guided prediction in the model's own target space.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if isinstance(w, (int, float)) and w == 1:
            out = model_fn(x, t, cond)
        else:
            b = x.shape[0]
            both = model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, uncond, b))
            out = cfg_combine(both[:b], both[b:], w)
        return out if to_x0 is None else to_x0(out, x, t)

    return fn
