"""Training-time densities: how t is drawn from uniforms u ∈ [0, 1).

A density maps u to the path's t (inverse-CDF sampling, so keyed uniforms from
``difftrain.diffusion.keyed`` give world-size independent draws). A density may be defined in
t (``Uniform``, ``LogitNormal``) or in log-SNR λ: subclasses of ``LogSNRDensity`` implement
``logsnr(u)`` and are mapped through ``path.t_from_logsnr``, so the model always receives the
path's t whichever space the density lives in.
"""
from __future__ import annotations

import math

import torch

from difftrain.diffusion.paths import Path


class Density:
    name = "density"

    def t(self, u: torch.Tensor, path: Path) -> torch.Tensor:
        """Map uniforms u ∈ [0, 1) to times t ∈ [0, 1] on ``path``."""
        raise NotImplementedError


class LogSNRDensity(Density):
    """A density over λ; t = path.t_from_logsnr(λ(u))."""

    def logsnr(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t(self, u, path):
        return path.t_from_logsnr(self.logsnr(u))


class Uniform(Density):
    """t ~ U(t_min, t_max). On the VP-cosine path this is the cosine λ-density of Salimans & Ho 2022."""

    name = "uniform"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"Uniform density needs 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def t(self, u, path):
        return self.t_min + (self.t_max - self.t_min) * u

    def __repr__(self):
        return f"Uniform(t_min={self.t_min}, t_max={self.t_max})"


class LogitNormal(Density):
    """t = sigmoid(m + s·n), n = Φ⁻¹(u) ~ N(0, 1): Esser et al. 2024 (SD3), sec. 3.1, eq. 19.

    Φ⁻¹(u) = √2·erfinv(2u − 1); u = 0 gives t = 0 (clamped later by ``Diffusion.t_min``).
    Oracle (m = 0, s = 1): P(t < 0.25) = Φ(logit 0.25) = 0.1360.
    """

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if not std > 0:
            raise ValueError(f"LogitNormal density needs std > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def t(self, u, path):
        n = math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0)
        return torch.sigmoid(self.mean + self.std * n)

    def __repr__(self):
        return f"LogitNormal(mean={self.mean}, std={self.std})"


DENSITIES = {"uniform": Uniform, "logit_normal": LogitNormal}
