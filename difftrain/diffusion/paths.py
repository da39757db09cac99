"""Continuous-time noising paths x_t = α(t)·x0 + σ(t)·ε, t ∈ [0, 1], t = 1 is noise.

A path is four elementwise functions of t — α, σ, their time derivatives — plus the log
signal-to-noise ratio λ(t) = log(α²/σ²) and its exact inverse. Everything downstream (targets,
densities, samplers) is written in terms of these, so a new path is one small class.

Endpoint guards: λ is clamped to [−LOGSNR_MAX, LOGSNR_MAX] (= ±30, i.e. SNR ≈ 1e±13), so t = 0 and
t = 1 give finite λ. ``t_from_logsnr(logsnr(t)) == t`` therefore holds wherever |λ(t)| < 30 (for
the cosine path, t ∈ (2e-7, 1 − 2e-7)); at the clamp it returns the t of λ = ±30. α and σ
themselves are not clamped: VP-cosine and RF reach α = 0, σ = 1 exactly at t = 1 and α = 1,
σ = 0 exactly at t = 0. All functions accept float32 and float64 tensors of any shape.
"""
from __future__ import annotations

import math

import torch

LOGSNR_MAX = 30.0


def _clamp_logsnr(lam: torch.Tensor) -> torch.Tensor:
    return lam.clamp(-LOGSNR_MAX, LOGSNR_MAX)


class Path:
    """Base class. Subclasses implement alpha, sigma, d_alpha, d_sigma, logsnr, t_from_logsnr."""

    name = "path"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """dα/dt."""
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """dσ/dt."""
        raise NotImplementedError

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = log(α²/σ²), clamped to ±LOGSNR_MAX."""
        raise NotImplementedError

    def t_from_logsnr(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of ``logsnr`` (λ is clamped to ±LOGSNR_MAX first)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPCosine(Path):
    """Variance-preserving cosine path: α = cos(πt/2), σ = sin(πt/2), λ = −2 ln tan(πt/2).

    Nichol & Dhariwal 2021 (eq. 17, without the offset s) in the continuous form of Salimans &
    Ho 2022 (sec. 2, "cosine schedule"). α is computed as sin(π(1 − t)/2) so that α(1) = 0
    exactly in float32 too (cos(π/2) rounds to −4e-8 there).
    """

    name = "vp_cosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * (1.0 - t))

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -0.5 * math.pi * self.sigma(t)

    def d_sigma(self, t):
        return 0.5 * math.pi * self.alpha(t)

    def logsnr(self, t):
        # λ = 2 (ln α − ln σ); log(0) = −inf at the ends is clamped.
        return _clamp_logsnr(2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t))))

    def t_from_logsnr(self, lam):
        # tan(πt/2) = exp(−λ/2)  =>  t = (2/π) atan(exp(−λ/2))
        return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * _clamp_logsnr(lam)))


class VPLinear(Path):
    """Continuous-time DDPM: the VP-SDE of Song et al. 2021 (eq. 11, and eq. 33 for its marginal).

    β(s) = β0 + s(β1 − β0), B(t) = ∫0^t β = β0 t + (β1 − β0) t²/2, α² = exp(−B), σ² = 1 − α².
    With β0 = 0.1, β1 = 20 this is the N → ∞ limit of DDPM's 1000 linear betas 1e-4 … 0.02.
    Note α(1) = exp(−5.025) ≈ 0.0066, not 0: the noise end is not pure noise.
    dσ/dt = β α² / (2σ) is infinite at t = 0; σ is floored at the dtype's ``tiny`` there,
    which gives a huge but finite value.
    """

    name = "vp_linear"

    def __init__(self, beta0: float = 0.1, beta1: float = 20.0):
        if not 0.0 < beta0 < beta1:
            raise ValueError(f"VPLinear needs 0 < beta0 < beta1, got {beta0}, {beta1}")
        self.beta0, self.beta1 = float(beta0), float(beta1)

    def _int_beta(self, t):
        return self.beta0 * t + 0.5 * (self.beta1 - self.beta0) * t * t

    def _beta(self, t):
        return self.beta0 + (self.beta1 - self.beta0) * t

    def alpha(self, t):
        return torch.exp(-0.5 * self._int_beta(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self._int_beta(t)))

    def d_alpha(self, t):
        return -0.5 * self._beta(t) * self.alpha(t)

    def d_sigma(self, t):
        a, s = self.alpha(t), self.sigma(t)
        return 0.5 * self._beta(t) * a * a / s.clamp_min(torch.finfo(s.dtype).tiny)

    def logsnr(self, t):
        b = self._int_beta(t)
        # log α² − log σ² = −B − log(1 − e^{−B})
        return _clamp_logsnr(-b - torch.log(-torch.expm1(-b)))

    def t_from_logsnr(self, lam):
        # α² = sigmoid(λ)  =>  B = −log sigmoid(λ) = softplus(−λ); solve the quadratic in t in the
        # cancellation-free form t = 2B / (β0 + sqrt(β0² + 2(β1 − β0)B)).
        b = torch.nn.functional.softplus(-_clamp_logsnr(lam))
        t = 2.0 * b / (self.beta0 + torch.sqrt(self.beta0**2 + 2.0 * (self.beta1 - self.beta0) * b))
        return t.clamp(max=1.0)  # λ below λ(1) ≈ −10.05 maps to t = 1

    def __repr__(self):
        return f"VPLinear(beta0={self.beta0}, beta1={self.beta1})"


class RectifiedFlow(Path):
    """Rectified flow / flow matching: α = 1 − t, σ = t (Liu et al. 2022, eq. 1; SD3 eq. 3).

    λ = 2 ln((1 − t)/t), inverse t = sigmoid(−λ/2). Not variance preserving.
    """

    name = "rf"

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t.clone()

    def d_alpha(self, t):
        return torch.full_like(t, -1.0)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def logsnr(self, t):
        return _clamp_logsnr(2.0 * (torch.log1p(-t) - torch.log(t)))

    def t_from_logsnr(self, lam):
        return torch.sigmoid(-0.5 * _clamp_logsnr(lam))


class DiscreteDDPM(Path):
    """Adapter for *pretrained* models trained on an integer timestep table (DDPM, Ho et al. 2020).

    From betas β_0..β_{N−1}: ᾱ_i = Π_{j≤i}(1 − β_j) (Ho et al. eq. 4), λ_i = log(ᾱ_i / (1 − ᾱ_i)).
    Index i ↔ continuous t = (i + 1)/N, so t = 1 is the noisiest index N − 1 and t = 0 (index −1)
    is clean data, where λ is LOGSNR_MAX. Between knots λ is linear in t, and α = sqrt(sigmoid(λ)),
    σ = sqrt(sigmoid(−λ)) (VP), so at every knot α² = ᾱ_i. ``timestep(t)`` gives the (fractional)
    index t·N − 1 to feed such a model. This is the only place integer timestep tables exist.
    """

    name = "ddpm_discrete"

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("DiscreteDDPM needs at least 2 betas, each in (0, 1)")
        n = betas.numel()
        abar = torch.cumprod(1.0 - betas, 0)
        lam = _clamp_logsnr(torch.log(abar) - torch.log1p(-abar))
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError("DiscreteDDPM: log-SNR of the table must be strictly decreasing")
        self.n = n
        self.betas = betas
        self._knots_t = torch.arange(n + 1, dtype=torch.float64) / n  # t of index −1 … N − 1
        self._knots_lam = torch.cat([torch.full((1,), LOGSNR_MAX, dtype=torch.float64), lam])

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """DDPM's linear table (Ho et al. 2020, sec. 4)."""
        return cls(torch.linspace(beta_start, beta_end, n, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Stable Diffusion's table: linear in sqrt(β)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous t → fractional table index t·N − 1 (index N − 1 at t = 1)."""
        return t * self.n - 1.0

    def t_from_timestep(self, i: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(i, dtype=torch.float64) + 1.0) / self.n

    def _segment(self, t):
        # knot index k with knots_t[k] <= t < knots_t[k+1], clamped to the table
        tt = t.detach().to(torch.float64).clamp(0.0, 1.0)
        k = (tt * self.n).floor().long().clamp(0, self.n - 1)
        return tt, k

    def logsnr(self, t):
        tt, k = self._segment(t)
        kt, kl = self._knots_t.to(t.device), self._knots_lam.to(t.device)
        w = (tt - kt[k]) * self.n
        return (kl[k] + w * (kl[k + 1] - kl[k])).to(t.dtype)

    def _d_logsnr(self, t):
        _, k = self._segment(t)
        kl = self._knots_lam.to(t.device)
        return ((kl[k + 1] - kl[k]) * self.n).to(t.dtype)

    def t_from_logsnr(self, lam):
        kl = self._knots_lam.to(lam.device)
        ll = _clamp_logsnr(lam.detach().to(torch.float64)).clamp(float(kl[-1]), float(kl[0]))
        # knots_lam is decreasing; searchsorted needs increasing, so search on −λ
        k = (torch.searchsorted(-kl, -ll, right=True) - 1).clamp(0, self.n - 1)
        w = (ll - kl[k]) / (kl[k + 1] - kl[k])
        return ((k.to(torch.float64) + w) / self.n).to(lam.dtype)

    def alpha(self, t):
        return torch.sigmoid(self.logsnr(t)).sqrt()

    def sigma(self, t):
        return torch.sigmoid(-self.logsnr(t)).sqrt()

    def d_alpha(self, t):
        # dα/dλ = α σ² / 2 for α = sqrt(sigmoid(λ))
        a, s = self.alpha(t), self.sigma(t)
        return 0.5 * a * s * s * self._d_logsnr(t)

    def d_sigma(self, t):
        a, s = self.alpha(t), self.sigma(t)
        return -0.5 * s * a * a * self._d_logsnr(t)

    def __repr__(self):
        return f"DiscreteDDPM(n={self.n})"


PATHS = {"vp_cosine": VPCosine, "vp_linear": VPLinear, "rf": RectifiedFlow}
