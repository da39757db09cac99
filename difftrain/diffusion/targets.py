"""Prediction targets and their exact inverses.

Every target is linear in (x0, ε): target = a(t)·x0 + b(t)·ε, with x_t = α·x0 + σ·ε.

| kind       | a    | b    | source                                                    |
| ---------- | ---- | ---- | --------------------------------------------------------- |
| "eps"      | 0    | 1    | Ho et al. 2020, eq. 14                                    |
| "x"        | 1    | 0    | predict the data                                          |
| "v"        | −σ   | α    | Salimans & Ho 2022, sec. 4 / appendix D: v = α·ε − σ·x0    |
| "velocity" | α'   | σ'   | dx_t/dt (Lipman et al. 2023 eq. 3; = ε − x0 on RF)        |
| "x_eps"    | 1    | 0    | both: 2C channels (x̃, ε̃) merged (see ``merge_x_eps``)     |

"x_eps" is Salimans & Ho 2022's "x & ε" output (sec. 4): the model predicts x̃ and ε̃ in twice the data's channels
and x̂0 = σ²·x̃ + α·(x_t − σ·ε̃), i.e. x̃ and the x implied by ε̃ weighted by σ² and α² (divided by α² + σ², which is
1 on VP paths), so x̂0 = x̃ at pure noise and x_t/α at σ = 0: well-defined at both ends, as a distilled student with
few steps needs. Its loss is in x space on the merged x̂0 (the target is x0; weightings treat it as "x").

On VP paths v = dx/dφ with x = cos φ·x0 + sin φ·ε (φ = atan(σ/α)), the rotation speed. On non-VP
paths "v" is the same formula with the path's α, σ — still an invertible target (the system's
determinant is α² + σ² > 0) but *not* the flow velocity: for rectified flow, v = (1 − t)ε − t·x0,
whereas "velocity" = ε − x0 is what Liu et al. 2022 regress. Use "velocity" for flow matching.

Inversion solves [[α, σ], [a, b]]·[x0, ε] = [x_t, pred]: with det = α·b − σ·a,
x0 = (b·x_t − σ·pred)/det, ε = (α·pred − a·x_t)/det. det is α for eps (singular at α = 0, t = 1 on
VP-cosine/RF: an eps model cannot say anything about x0 from pure noise), −σ for x (singular at
t = 0), α² + σ² for v and α·σ' − σ·α' for velocity (π/2 on VP-cosine, 1 on RF). |det| is floored
at sqrt(finfo.tiny) (1e-19 in float32) so that singular points give huge values, not NaN.

Broadcasting: t is [B] (or a scalar), x0/ε/pred/x_t are [B, ...]; coefficients are cast to the
data's dtype.
"""
from __future__ import annotations

import torch

from difftrain.diffusion.paths import Path

TARGETS = ("eps", "v", "x", "velocity", "x_eps")


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample coefficients [B] (or scalar) to broadcast against [B, ...]."""
    c = c.to(like.dtype)
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


def coefficients(kind: str, t: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with target = a·x0 + b·ε, each shaped like t."""
    if kind == "eps":
        return torch.zeros_like(t), torch.ones_like(t)
    if kind in ("x", "x_eps"):  # x_eps: its loss is on the merged x̂0
        return torch.ones_like(t), torch.zeros_like(t)
    if kind == "v":
        return -path.sigma(t), path.alpha(t)
    if kind == "velocity":
        return path.d_alpha(t), path.d_sigma(t)
    raise ValueError(f"unknown prediction target '{kind}'; valid: {', '.join(TARGETS)}")


def target(kind: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, path: Path) -> torch.Tensor:
    """The regression target of ``kind`` for clean data x0 and noise ε at time t."""
    if kind == "eps":
        return eps
    if kind in ("x", "x_eps"):
        return x0
    a, b = coefficients(kind, t, path)
    return _bcast(a, x0) * x0 + _bcast(b, x0) * eps


def merge_x_eps(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, path: Path) -> torch.Tensor:
    """x̂0 of an "x_eps" prediction [B, 2C, ...] (x̃ then ε̃ along dim 1) at x_t [B, C, ...]:
    (σ²·x̃ + α·(x_t − σ·ε̃)) / (α² + σ²) (Salimans & Ho 2022, sec. 4)."""
    c = x_t.shape[1]
    if pred.shape[1] != 2 * c:
        raise ValueError(f"diffusion.target=x_eps needs a model with twice the data's channels ({2 * c}, "
                         f"model.args.out_channels), got {pred.shape[1]}")
    x_pred, eps_pred = pred[:, :c], pred[:, c:]
    alpha, sigma = (_bcast(c_, x_t) for c_ in (path.alpha(t), path.sigma(t)))
    return (sigma.square() * x_pred + alpha * (x_t - sigma * eps_pred)) / (alpha.square() + sigma.square())


def to_x0_eps(kind: str, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, path: Path):
    """(x̂0, ε̂) from a prediction of ``kind`` at x_t; the exact inverse of ``target``."""
    if kind == "x_eps":
        x0 = merge_x_eps(pred, x_t, t, path)
        sigma = _bcast(path.sigma(t), x_t)
        floor = torch.finfo(sigma.dtype).tiny ** 0.5
        return x0, (x_t - _bcast(path.alpha(t), x_t) * x0) / sigma.clamp(min=floor)
    a, b = coefficients(kind, t, path)
    alpha, sigma = path.alpha(t), path.sigma(t)
    det = alpha * b - sigma * a
    floor = torch.finfo(det.dtype).tiny ** 0.5
    det = torch.where(det.abs() < floor, torch.where(det < 0, -floor, floor), det)
    a, b, alpha, sigma, det = (_bcast(c, x_t) for c in (a, b, alpha, sigma, det))
    x0 = (b * x_t - sigma * pred) / det
    eps = (alpha * pred - a * x_t) / det
    return x0, eps


def to_x0(kind: str, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, path: Path) -> torch.Tensor:
    """x̂0 only (what samplers consume)."""
    if kind == "x":
        return pred
    if kind == "x_eps":
        return merge_x_eps(pred, x_t, t, path)
    return to_x0_eps(kind, pred, x_t, t, path)[0]
