"""Loss weightings: per-sample factors on the regression loss as functions of λ = log SNR.

``Weighting.weight(t, path, target_kind) -> Tensor [B]`` multiplies the per-sample loss
‖pred − target‖² of ``target_kind`` on ``path`` (``Diffusion.loss_weight`` combines it with the
density's importance weight). Built-ins are defined on one reference loss and carried to the
configured target exactly:

For a fixed x_t, a prediction error δ in the target's space is an error σ/det·δ in x̂0 and
α/det·δ in ε̂ (``targets.to_x0_eps``: x̂0 = (b·x_t − σ·pred)/det, ε̂ = (α·pred − a·x_t)/det). So a
weight w_x(λ) on the x-loss ‖x̂0 − x0‖² is the weight w_x(λ)·(σ/det)² on the target loss (and
w_ε(λ) on the ε-loss is w_ε·(α/det)²). On VP paths this gives the published per-target forms,
e.g. min-SNR: eps min(SNR, γ)/SNR, v min(SNR, γ)/(SNR + 1), x min(SNR, γ); on rectified flow
with the velocity target (det = 1, σ = t) min(SNR, γ)·t², with SNR = exp(λ) = ((1 − t)/t)².
"""
from __future__ import annotations

import math

import torch

from difftrain.diffusion import targets as T
from difftrain.diffusion.paths import Path


def x_to_target_factor(t: torch.Tensor, path: Path, target_kind: str) -> torch.Tensor:
    """(σ/det)²: the factor turning a weight on the x0-loss into a weight on ``target_kind``'s loss."""
    a, b = T.coefficients(target_kind, t, path)
    alpha, sigma = path.alpha(t), path.sigma(t)
    det = alpha * b - sigma * a
    floor = torch.finfo(det.dtype).tiny ** 0.5
    det = torch.where(det.abs() < floor, torch.full_like(det, floor), det.abs())
    return (sigma / det) ** 2


class Weighting:
    """Base class: implement ``weight(t, path, target_kind) -> Tensor [B]``; register in WEIGHTINGS."""

    name = "weighting"

    def weight(self, t: torch.Tensor, path: Path, target_kind: str) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class NoWeighting(Weighting):
    """Weight 1 (``Diffusion.loss_weight`` skips it, so the loss is bitwise the unweighted one)."""

    name = "none"

    def weight(self, t, path, target_kind):
        return torch.ones_like(t)


class XSpaceWeighting(Weighting):
    """A weight w_x(λ) on the x0-loss, carried to any target by (σ/det)² (module docstring)."""

    def x_weight(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t, path, target_kind):
        tt = t.detach().to(torch.float64)
        lam = path.logsnr(tt)
        if target_kind in ("x", "x_eps"):  # x_eps: a loss on the merged x̂0
            w = self.x_weight(lam)
        elif target_kind == "eps":  # (σ/α)² = 1/SNR, computed in log space (stable at α → 0)
            w = torch.exp(torch.log(self.x_weight(lam)) - lam)
        else:
            w = self.x_weight(lam) * x_to_target_factor(tt, path, target_kind)
        return w.to(t.dtype)


class MinSNR(XSpaceWeighting):
    """Min-SNR-γ: w_x = min(SNR, γ), γ = 5 (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", ICCV 2023, per-target forms:
    eps min(SNR, γ)/SNR, x min(SNR, γ), v min(SNR, γ)/(SNR + 1))."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        if not gamma > 0:
            raise ValueError(f"min_snr needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def x_weight(self, lam):
        return torch.minimum(torch.exp(lam), torch.full_like(lam, self.gamma))

    def __repr__(self):
        return f"MinSNR(gamma={self.gamma})"


class TruncatedSNR(XSpaceWeighting):
    """Truncated SNR: w_x = max(SNR, 1), i.e. L = max(‖x̂ − x‖²·SNR, ‖x̂ − x‖²) (Salimans & Ho 2022,
    "Progressive Distillation", sec. 4, "truncated SNR weighting"); on eps this is max(1, 1/SNR)."""

    name = "truncated_snr"

    def x_weight(self, lam):
        return torch.clamp(torch.exp(lam), min=1.0)


class SD3(Weighting):
    """SD3 time-density weightings (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 3.1):
    sampling t ~ π(t) on the rectified-flow loss equals uniform t with the loss weighted by π(t)
    (the paper writes this as w_t = t/(1 − t)·π(t) on its ε-form of the loss). This weighting
    returns that π as a function of λ through the rectified-flow time t_RF = sigmoid(−λ/2):

    * ``form="lognorm"`` (eq. 19): π_ln(t; m, s) = exp(−(logit t − m)²/(2s²)) / (s√(2π)·t(1 − t))
    * ``form="cosmap"`` ("CosMap"): π(t) = 2 / (π(1 − 2t + 2t²))

    With ``density=uniform`` on the ``rf`` path and the ``velocity`` target this is exactly the
    paper's weighted form of lognorm / CosMap sampling. On other paths it is the same function of λ
    applied to the configured target's loss (no target conversion). The "mode" form needs
    a numerical inverse and is not implemented.
    """

    name = "sd3"
    FORMS = ("lognorm", "cosmap")

    def __init__(self, form: str = "lognorm", m: float = 0.0, s: float = 1.0):
        if form not in self.FORMS:
            raise ValueError(f"sd3 weighting form={form!r} is not one of: {', '.join(self.FORMS)}")
        if not s > 0:
            raise ValueError(f"sd3 weighting needs s > 0, got {s}")
        self.form, self.m, self.s = form, float(m), float(s)

    def weight(self, t, path, target_kind):
        lam = path.logsnr(t.detach().to(torch.float64))
        trf = torch.sigmoid(-0.5 * lam)
        if self.form == "lognorm":
            z = -0.5 * lam  # logit t_RF
            w = torch.exp(-0.5 * ((z - self.m) / self.s) ** 2) / (self.s * math.sqrt(2 * math.pi) * trf * (1 - trf))
        else:
            w = 2.0 / (math.pi * (1.0 - 2.0 * trf + 2.0 * trf * trf))
        return w.to(t.dtype)

    def __repr__(self):
        return f"SD3(form={self.form!r}, m={self.m}, s={self.s})"


WEIGHTINGS = {"none": NoWeighting, "min_snr": MinSNR, "sd3": SD3, "truncated_snr": TruncatedSNR}
