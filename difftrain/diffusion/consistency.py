"""The math of consistency models, on our paths: boundary scalings, discretisations and schedules.

Sources: Song et al. 2023, "Consistency Models" (CM: sec. 3 and appendix C for c_skip/c_out, eq. 8 for the
Karras grid, Alg. 2-3 for CD/CT, Table 3 and appendix C for CT's N(k) and mu(k)); Song & Dhariwal 2023, "Improved
Techniques for Training Consistency Models" (iCT: sec. 3.4 doubling N(k), sec. 3.5 lognormal sigma sampling, sec. 3.2
weight 1/(sigma_{i+1} - sigma_i)); Luo et al. 2023, "Latent Consistency Models" (LCM: eq. 9 scalings on 10 t, the
skipping-step solver); Karras et al. 2022 (EDM: c_skip, c_out of the denoiser, sec. 5 and Table 1).

A consistency function on a path x_t = alpha(t) x0 + sigma(t) eps is written ``f(x_t, t) = a(t) x_t + b(t) x0^(x_t, t)``
with x0^ the model's data prediction (``Diffusion.sample_x0``), so every target kind (eps, v, x, velocity) serves.
``boundary_coefficients`` gives (a, b) for:

* ``none``: f = x0^ (a = 0, b = 1). At t = 0 x0^ is x itself for eps, v and velocity models (sigma = 0), so the
  boundary condition f(x, 0) = x holds exactly there; an x-predicting model has no such guarantee (refused).
* ``lcm``: LCM's c_skip, c_out of the timestep 1000 t scaled by 10 (eq. 9; diffusers ``LCMScheduler``, which a served
  VP student's scheduler applies): c_skip(0) = 1, c_out(0) = 0, c_skip < 1e-4 beyond t = 0.05.
* ``edm``: CM's scalings in EDM's sigma_e = sigma / alpha (x in variance-exploding form x_t / alpha) with sigma_min
  = 0.002, converted from the network F to our x0^ through EDM's own denoiser D = c_skip^EDM x + c_out^EDM F:
  f = [c_skip^CM - r c_skip^EDM] x_t / alpha + r x0^, r = c_out^CM / c_out^EDM = (sigma_e - sigma_min) / sigma_e.
  f = x_t / alpha exactly at sigma_e = sigma_min (sigma_e is clamped there) and f -> x0^ as alpha -> 0.
"""
from __future__ import annotations

import math

import torch

from difftrain.diffusion.paths import Path

SIGMA_DATA = 0.5
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
BOUNDARIES = ("none", "lcm", "edm")
SAMPLER_OF = {"none": "consistency", "lcm": "lcm", "edm": "consistency_edm"}  # the multistep sampler per boundary


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """CM's (c_skip, c_out, c_in) at EDM noise level sigma (CM appendix C): c_skip = sd^2 / ((s - s_min)^2 + sd^2),
    c_out = sd (s - s_min) / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (sigma - sigma_min) / torch.sqrt(sigma ** 2 + sd2)
    return c_skip, c_out, 1.0 / torch.sqrt(sigma ** 2 + sd2)


def lcm_scalings(timestep: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA):
    """LCM's (c_skip, c_out) of a discrete timestep (0-999) scaled by 10 (LCM eq. 9 as diffusers' ``LCMScheduler``
    computes them): c_skip = sd^2 / ((10 s)^2 + sd^2), c_out = 10 s / sqrt((10 s)^2 + sd^2)."""
    s = timestep * timestep_scaling
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / torch.sqrt(s ** 2 + sigma_data ** 2)


def boundary_coefficients(kind: str, t: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of f = a x_t + b x0^ at times t (any shape, float64 recommended); see the module docstring."""
    if kind == "none":
        return torch.zeros_like(t), torch.ones_like(t)
    if kind == "lcm":
        return lcm_scalings(1000.0 * t)
    if kind == "edm":
        alpha = path.alpha(t)
        safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        sigma_e = (path.sigma(t) / safe).clamp(min=SIGMA_MIN)
        r = (sigma_e - SIGMA_MIN) / sigma_e
        c_skip_cm = edm_scalings(sigma_e)[0]
        c_skip_edm = SIGMA_DATA ** 2 / (sigma_e ** 2 + SIGMA_DATA ** 2)
        a = torch.where(alpha > 0, (c_skip_cm - r * c_skip_edm) / safe, torch.zeros_like(t))
        return a, torch.where(alpha > 0, r, torch.ones_like(t))
    raise ValueError(f"unknown consistency boundary '{kind}'; valid: {', '.join(BOUNDARIES)}")


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """The n EDM noise levels of CM eq. 8 / Karras et al. 2022 eq. 5, from sigma_max down to sigma_min (float64):
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    if n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 levels, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


def sigma_to_t(sigma: torch.Tensor, path: Path) -> torch.Tensor:
    """The time whose EDM noise level sigma_e = sigma / alpha is ``sigma`` (log-SNR lambda = -2 ln sigma)."""
    return path.t_from_logsnr(-2.0 * torch.log(sigma))


def ict_steps(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1 / s0) + 1)): it
    doubles from s0 to s1 over K = ``total`` iterations (iCT sec. 3.4, eq. 7). Returns the number of levels."""
    k_prime = max(1, math.floor(total / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def ct_schedule(k: int, total: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> tuple[int, float]:
    """The original CT's (N(k), mu(k)) (CM appendix C, Table 3 values for CIFAR-10):
    N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln mu0 / N(k))."""
    n = math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    return n, math.exp(s0 * math.log(mu0) / n)


def lognormal_interval_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's probabilities of the intervals (sigma_i, sigma_{i+1}) of an increasing grid (sec. 3.5):
    p_i ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))."""
    s = torch.sort(sigmas.double()).values
    e = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    p = e[1:] - e[:-1]
    return p / p.sum()

