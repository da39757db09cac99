"""The ``Diffusion`` bundle: path + training density + prediction target + loss weighting + t clamp.

A stage uses it as

    t = diff.t_from_uniform(u)                     # u: keyed uniforms [B]
    x_t = diff.add_noise(x0, eps, t)
    pred = model(x_t, t, cond)
    loss = diff.loss(pred, x0, eps, t, weight)     # [B]; reduce (and log binned by t) outside

and sampling uses ``diff.sample_x0`` (``x0_from_pred``, clipped for pixel-space eps models) to turn model
outputs into the data predictions the samplers consume (see ``denoiser`` and ``guidance.guided_denoiser(..., to_x0=...)``).

``loss`` multiplies in ``loss_weight(t)`` — the density's importance weight times the weighting —
and the explicit ``weight``; with no importance weight and ``weighting=none`` it is the plain loss,
bit for bit. Path, density and weighting meet only through t and λ = path.logsnr(t), so any
combination is valid (docs/DIFFUSION.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from difftrain.diffusion import targets as T
from difftrain.diffusion.densities import DENSITIES, Density
from difftrain.diffusion.paths import PATHS, Path
from difftrain.diffusion.weightings import WEIGHTINGS, NoWeighting, Weighting


def _promote(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred − target in at least float32, flattened to [B, d]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dtype) - target.to(dtype)).flatten(1)


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B]: mean over the non-batch dims of (pred − target)² (the diffusion loss of Ho et al. 2020, eq. 14)."""
    return _promote(pred, target).square().mean(dim=1)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """[B]: the pseudo-Huber distance sqrt(‖pred − target‖² + c²) − c per sample (Song & Dhariwal 2023, "Improved
    Techniques for Training Consistency Models", sec. 3.3; RF++, Lee et al. 2024, sec. 4), ‖·‖ the L2 norm over all
    d non-batch elements and c = 0.00054·√d by default (both papers; RF++'s released code uses 0.00054·d, a known bug
    — REFERENCES C). ≈ ‖r‖²/(2c) for ‖r‖ ≪ c, ≈ ‖r‖ − c for ‖r‖ ≫ c. Computed as ‖r‖²/(sqrt(‖r‖² + c²) + c), the same
    value without the cancellation of the difference form for small residuals.
    """
    err = _promote(pred, target)
    c = 0.00054 * math.sqrt(err.shape[1]) if c is None else float(c)
    if not c > 0:
        raise ValueError(f"pseudo_huber needs c > 0, got {c}")
    sq = err.square().sum(dim=1)
    return sq / (torch.sqrt(sq + c * c) + c)


DISTANCES = {"l2": squared_error, "pseudo_huber": pseudo_huber}  # a stage's ``loss: l2 | pseudo_huber``


@dataclass
class Diffusion:
    path: Path
    density: Density
    target_kind: str = "v"
    t_min: float = 1e-4
    t_max: float = 1.0 - 1e-4
    weighting: Weighting = field(default_factory=NoWeighting)
    x0_clip: float = 0.0  # sampling: clamp x̂0 to [-x0_clip, x0_clip]; 0 = off (see ``sample_x0``)

    def __post_init__(self):
        if self.weighting is None:
            self.weighting = NoWeighting()
        if self.target_kind not in T.TARGETS:
            raise ValueError(f"unknown prediction target '{self.target_kind}'; valid: {', '.join(T.TARGETS)}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"Diffusion needs 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    def t_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Training times from uniforms u ∈ [0, 1): the density's t, clamped to [t_min, t_max]."""
        return self.density.t(u, self.path).clamp(self.t_min, self.t_max)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α(t)·x0 + σ(t)·ε; t is [B], x0 and ε are [B, ...]."""
        a = T._bcast(self.path.alpha(t), x0)
        s = T._bcast(self.path.sigma(t), x0)
        return a * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return T.target(self.target_kind, x0, eps, t, self.path)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor [B] from the density's importance weight and the weighting, or None."""
        w = self.density.weight(t, self.path)
        if not isinstance(self.weighting, NoWeighting):
            ww = self.weighting.weight(t, self.path, self.target_kind)
            w = ww if w is None else w * ww
        return w

    def loss(self, pred, x0, eps, t, weight: torch.Tensor | None = None, distance: str = "l2") -> torch.Tensor:
        """Per-sample loss [B]: ``DISTANCES[distance](pred, target)`` (``l2``: mean over non-batch dims of
        (pred − target)²; ``pseudo_huber``: see ``pseudo_huber``), times ``loss_weight(t)`` and the explicit
        ``weight`` [B] (each when not None).

        Computed in at least float32 whatever the prediction's dtype (bf16 autocast).
        """
        if distance not in DISTANCES:
            raise ValueError(f"unknown loss distance '{distance}'; valid: {', '.join(DISTANCES)}")
        dtype = torch.promote_types(pred.dtype, torch.float32)
        if self.target_kind == "x_eps":  # the merged x̂0 against x0 (targets.merge_x_eps)
            pred = T.merge_x_eps(pred.to(dtype), self.add_noise(x0, eps, t).to(dtype), t.to(dtype), self.path)
        per_sample = DISTANCES[distance](pred, self.target(x0, eps, t))
        lw = self.loss_weight(t)
        if lw is not None:
            per_sample = per_sample * lw.to(dtype)
        if weight is not None:
            per_sample = per_sample * weight.to(dtype)
        return per_sample

    def x0_from_pred(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 from a model prediction of this bundle's target kind (exact inverse of ``target``)."""
        return T.to_x0(self.target_kind, pred, x_t, t, self.path)

    def sample_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 for the samplers: ``x0_from_pred``, clamped to ±``x0_clip`` when set.

        An eps prediction says nothing about x0 where α = 0 (t = 1 on VP-cosine and RF: zero terminal SNR,
        Lin et al. 2024, sec. 3.2), so x̂0 = (x − σ·ε̂)/α blows up at the sampler's first step and amplifies
        ε̂'s error by σ/α near it. ``build_diffusion(..., pixel_space=True)`` therefore clips eps models' x̂0 to
        the data range [-1, 1], the "clipped x̂0" of DDPM's sampler (Ho et al. 2020, appendix / Saharia et al.
        2022, sec. 2.3 "static thresholding"). Latent-space eps models get no clip: train them with v or
        velocity targets.
        """
        x0 = self.x0_from_pred(pred, x_t, t)
        return x0.clamp(-self.x0_clip, self.x0_clip) if self.x0_clip > 0 else x0

    def to_x0_eps(self, pred, x_t, t):
        return T.to_x0_eps(self.target_kind, pred, x_t, t, self.path)

    def denoiser(self, model_fn, cond=None):
        """``model_fn(x_t, t, cond) -> pred`` as a sampler's ``denoise_fn(x, t) -> x̂0``."""
        return lambda x, t: self.sample_x0(model_fn(x, t, cond), x, t)


def build_diffusion(cfg, pixel_space: bool = False) -> Diffusion:
    """From a ``difftrain.config.DiffusionConfig``. Errors name the offending config key. ``pixel_space``
    (no VAE: data in [-1, 1]) turns on the sampling clip of x̂0 for eps models (``Diffusion.sample_x0``)."""
    from difftrain.config import ConfigError

    if cfg.path not in PATHS:
        raise ConfigError(f"config key 'diffusion.path' = {cfg.path!r} is not one of: {', '.join(PATHS)}")
    if cfg.density not in DENSITIES:
        raise ConfigError(f"config key 'diffusion.density' = {cfg.density!r} is not one of: {', '.join(DENSITIES)}")
    try:
        density = DENSITIES[cfg.density](**cfg.density_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'diffusion.density_args' is invalid for density {cfg.density!r}: {e}") from None
    weighting_name = getattr(cfg, "weighting", "none")
    if weighting_name not in WEIGHTINGS:
        raise ConfigError(
            f"config key 'diffusion.weighting' = {weighting_name!r} is not one of: {', '.join(WEIGHTINGS)}"
        )
    try:
        weighting = WEIGHTINGS[weighting_name](**getattr(cfg, "weighting_args", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"config key 'diffusion.weighting_args' is invalid for weighting {weighting_name!r}: {e}"
        ) from None
    try:
        return Diffusion(PATHS[cfg.path](), density, cfg.target, cfg.t_min, cfg.t_max, weighting,
                         x0_clip=1.0 if pixel_space and cfg.target == "eps" else 0.0)
    except ValueError as e:
        raise ConfigError(f"config section 'diffusion': {e}") from None
