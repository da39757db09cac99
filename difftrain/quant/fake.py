"""Fake quantisation with learned step sizes: LSQ (Esser et al. 2020, "Learned Step Size Quantization",
arXiv:1902.08153) with an integer zero point for the asymmetric case (REFERENCES F):

    x̂ = s · (clip(round(x / s) + z, q_min, q_max) − z)   (computed as s · (round(clip(x / s + z)) − z))

``round`` passes its gradient straight through (the STE, LSQ Eq. 2's ⌊·⌉), so ∂x̂/∂x is 1 inside the clipping range
and 0 outside, and the step size s gets LSQ's gradient (Eq. 3): −x/s + round(x/s) inside, q_min − z or q_max − z
outside, scaled by g = 1 / sqrt(N · Q_P) (Eq. 4-5: N the number of values sharing the step, a weight group's size or
a layer's features per sample; Q_P the top of the integer range). Symmetric quantisation is z = 0 on the signed range
[−2^(b−1), 2^(b−1) − 1] (torchao's and PyTorch's int ranges); asymmetric is the unsigned range [0, 2^b − 1] with a
learned z that is rounded in the forward pass (the STE again), so the integers an export writes are the ones
training saw. Every value maps to one of at most 2^b levels per step size, and x̂ is a fixed point (q(q(x)) = q(x)).
"""
from __future__ import annotations

import torch

EPS = 1e-8  # the smallest step size (a constant group of weights has range 0)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(q_min, q_max) of a b-bit integer: signed for symmetric, unsigned for asymmetric quantisation."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator); exactly round(x) (x − x.detach() is
    0), where x + (round(x) − x).detach() can be an ulp off."""
    return torch.round(x).detach() + (x - x.detach())


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward (exactly), gradient times g backward (LSQ's ``gradscale``, Sec. 2.2)."""
    return x.detach() + (x * g - (x * g).detach())


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int,
               g: float) -> torch.Tensor:
    """x̂ = s · (round(clip(x / s + z, q_min, q_max)) − z) with z = round(zero) (None: 0, symmetric); ``scale`` and
    ``zero`` broadcast against x. Clipping before rounding (LSQ Eq. 1's order; the same values as REFERENCES F's
    clip(round(x / s) + z) for an integer z and bounds) puts the STE's edge at the clipping range itself: ∂x̂/∂x = 1
    for x/s + z in [q_min, q_max], 0 outside. Gradients: STE for x, LSQ's (times g) for s and z."""
    s = grad_scale(scale, g).clamp_min(EPS)
    z = round_ste(grad_scale(zero, g)) if zero is not None else 0.0
    return s * (round_ste(torch.clamp(x / s + z, qmin, qmax)) - z)


def to_ints(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """The integers k of :func:`fake_quant` (x̂ = s · (k − z)): what an export stores."""
    z = torch.round(zero) if zero is not None else 0.0
    return torch.round(torch.clamp(x / scale.clamp_min(EPS) + z, qmin, qmax))


def grouped(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """A Linear / Conv2d weight as [out, groups, size]: each row of the last dimension shares a step size. Conv2d
    weights are flattened over (in, kh, kw), as torchao groups a Linear's input dimension."""
    flat = w.reshape(w.shape[0], -1)
    if granularity == "tensor":
        return flat.reshape(1, 1, -1)
    if granularity == "channel":
        return flat[:, None, :]
    return flat.reshape(flat.shape[0], -1, group_size)


def range_init(v: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s, z) covering ``v``'s range over its last dimension without clipping (min/max calibration; LSQ's own init
    2<|v|>/sqrt(Q_P) clips most of a weight's range at 8 bits and more): s = max|v| / Q_P symmetric, s = (max − min)
    / (q_max − q_min) and z = q_min − min / s asymmetric."""
    if symmetric:
        return (v.abs().amax(-1, keepdim=True) / qmax).clamp_min(EPS), None
    lo, hi = v.amin(-1, keepdim=True).clamp_max(0), v.amax(-1, keepdim=True).clamp_min(0)
    s = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    return s, qmin - lo / s
