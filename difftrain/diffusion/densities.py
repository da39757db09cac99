"""Training-time densities: how t is drawn from uniforms u ∈ [0, 1).

A density maps u to the path's t by inverse-CDF sampling, so keyed uniforms from
``difftrain.diffusion.keyed`` give world-size independent draws. Two kinds:

* **t-densities** (``TDensity``: ``uniform``, ``logit_normal``, ``u_shaped``) are defined in the
  path's own t. Optionally ``on_path="rf"`` (any name in ``PATHS``) defines them on a *reference*
  path instead: t_ref is drawn, λ = ref.logsnr(t_ref) and t = path.t_from_logsnr(λ), so e.g. SD3's
  logit-normal (defined on rectified flow) gives the same λ-distribution on a VP path.
* **λ-densities** (``LogSNRDensity``: ``cosine``, ``laplace``, ``edm``) implement ``logsnr(u)``
  and are mapped through ``path.t_from_logsnr``, so they combine with every path and target.

Every u-map is decreasing in λ (u → 0 is clean data, u → 1 is noise) and guards u ∈ {0, 1}: an
infinite λ is clamped to ±LOGSNR_MAX by the path; ``Diffusion`` clamps t to [t_min, t_max].

Densities and probabilities: ``log_prob_logsnr(lam, path)`` is the log density of λ that sampling
on ``path`` produces (t-densities add log|dt/dλ| of the path). It is optional for user densities;
it is only needed for importance weights.

Importance weights (contract). ``Density.weight(t, path) -> Tensor | None`` is a per-sample factor
on the loss, [B] like t, or None (the default: no weighting). Every built-in density accepts
``importance=<name in DENSITIES>`` and ``importance_args={...}``: it then still *samples* from
itself but returns w = p_target(λ) / p_self(λ) (λ = path.logsnr(t)), so that for any f,
E_self[w·f(λ)] = E_target[f(λ)] and E_self[w] = 1 (exactly, up to the t clamp). That is,
the trained objective is the target density's, with the sampling density's coverage — e.g.
``uniform`` with ``importance: laplace`` optimises the Laplace objective (Hang & Gu 2024) while
drawing t uniformly. Weights are unbounded where the sampling density is thin relative to the
target; pick a sampling density with heavier tails than the target.
"""
from __future__ import annotations

import math

import torch

from difftrain.diffusion.paths import LOGSNR_MAX, PATHS, Path

_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _ndtri(u: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(u) = √2·erfinv(2u − 1); ±inf at u ∈ {0, 1}."""
    return _SQRT2 * torch.special.erfinv(2.0 * u - 1.0)


def _normal_logpdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - _LOG_SQRT_2PI


def log_abs_dt_dlogsnr(lam: torch.Tensor, path: Path) -> torch.Tensor:
    """log|dt/dλ| of ``path.t_from_logsnr`` at λ (float64, by autograd; central differences for
    paths whose inverse is not differentiable, e.g. ``DiscreteDDPM``)."""
    lam = lam.detach().to(torch.float64)
    with torch.enable_grad():
        x = lam.clone().requires_grad_(True)
        t = path.t_from_logsnr(x)
        if t.requires_grad:
            (g,) = torch.autograd.grad(t.sum(), x)
            return torch.log(g.abs())
    h = 1e-5 * (1.0 + lam.abs())
    g = (path.t_from_logsnr(lam + h) - path.t_from_logsnr(lam - h)) / (2.0 * h)
    return torch.log(g.abs())


class Density:
    """Base class. Implement ``t(u, path)`` (u ∈ [0, 1) → t ∈ [0, 1]); optionally
    ``log_prob_logsnr(lam, path)``; register in ``DENSITIES`` to make it configurable."""

    name = "density"
    importance: "Density | None" = None  # class-level defaults: subclasses need not call __init__

    def __init__(self, importance: str | None = None, importance_args: dict | None = None):
        if importance is None:
            if importance_args:
                raise ValueError("importance_args given without importance")
            self.importance = None
            return
        if importance not in DENSITIES:
            raise ValueError(f"importance={importance!r} is not one of: {', '.join(DENSITIES)}")
        self.importance = DENSITIES[importance](**(importance_args or {}))
        if self.importance.importance is not None:
            raise ValueError("an importance target cannot itself have an importance target")

    def t(self, u: torch.Tensor, path: Path) -> torch.Tensor:
        """Map uniforms u ∈ [0, 1) to times t ∈ [0, 1] on ``path``."""
        raise NotImplementedError

    def log_prob_logsnr(self, lam: torch.Tensor, path: Path) -> torch.Tensor:
        """log p(λ) of the λ this density produces on ``path`` (needed only for importance weights)."""
        raise NotImplementedError(f"{type(self).__name__} does not define log_prob_logsnr")

    def weight(self, t: torch.Tensor, path: Path) -> torch.Tensor | None:
        """Per-sample loss factor [B] or None. Built-ins: p_importance(λ)/p_self(λ), mean 1 under self."""
        if self.importance is None:
            return None
        lam = path.logsnr(t.detach().to(torch.float64))
        logw = self.importance.log_prob_logsnr(lam, path) - self.log_prob_logsnr(lam, path)
        return torch.exp(logw).to(t.dtype)

    def _imp_repr(self) -> str:
        return "" if self.importance is None else f", importance={self.importance!r}"


class LogSNRDensity(Density):
    """A density over λ; t = path.t_from_logsnr(λ(u)). Implement ``logsnr(u)`` (and ``log_prob(lam)``
    for importance weights)."""

    def logsnr(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define log_prob")

    def t(self, u, path):
        return path.t_from_logsnr(self.logsnr(u))

    def log_prob_logsnr(self, lam, path):
        return self.log_prob(lam)


class TDensity(Density):
    """A density over t, implemented by ``sample_t(u)`` and (optionally) ``log_prob_t(t)``.

    ``on_path=None``: t is used on the configured path as is. ``on_path="<path name>"``: t is drawn
    on that reference path and carried to the configured path through λ.
    """

    on_path: Path | None = None

    def __init__(self, on_path: str | None = None, importance=None, importance_args=None):
        super().__init__(importance, importance_args)
        if on_path is not None and on_path not in PATHS:
            raise ValueError(f"on_path={on_path!r} is not one of: {', '.join(PATHS)}")
        self.on_path = None if on_path is None else PATHS[on_path]()

    def sample_t(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob_t(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define log_prob_t")

    def t(self, u, path):
        t = self.sample_t(u)
        if self.on_path is not None:
            t = path.t_from_logsnr(self.on_path.logsnr(t))
        return t

    def log_prob_logsnr(self, lam, path):
        ref = self.on_path if self.on_path is not None else path
        lam = lam.to(torch.float64)
        return self.log_prob_t(ref.t_from_logsnr(lam)) + log_abs_dt_dlogsnr(lam, ref)

    def _path_repr(self) -> str:
        return "" if self.on_path is None else f", on_path={self.on_path.name!r}"


class Uniform(TDensity):
    """t ~ U(t_min, t_max). On the VP-cosine path this is the cosine λ-density of Salimans & Ho 2022."""

    name = "uniform"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0, **kw):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"Uniform density needs 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        super().__init__(**kw)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def sample_t(self, u):
        return self.t_min + (self.t_max - self.t_min) * u

    def log_prob_t(self, t):
        inside = (t >= self.t_min) & (t <= self.t_max)
        return torch.where(inside, -math.log(self.t_max - self.t_min), -math.inf).to(t.dtype)

    def __repr__(self):
        return f"Uniform(t_min={self.t_min}, t_max={self.t_max}{self._path_repr()}{self._imp_repr()})"


class LogitNormal(TDensity):
    """t = sigmoid(m + s·n), n = Φ⁻¹(u) ~ N(0, 1): Esser et al. 2024 (SD3), sec. 3.1, eq. 19.

    ``shift`` (default 1 = off) is SD3's resolution-dependent shift (Esser et al. 2024, sec. 5.3.2,
    eq. 23): t' = shift·t / (1 + (shift − 1)·t), i.e. logit t' = logit t + ln shift; shift > 1 moves
    mass to the noisy end (SD3 uses shift = 3 at 1024²).
    Φ⁻¹(u) = √2·erfinv(2u − 1); u = 0 gives t = 0 (clamped later by ``Diffusion.t_min``).
    Oracle (m = 0, s = 1): P(t < 0.25) = Φ(logit 0.25) = 0.1360.
    """

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, **kw):
        if not std > 0:
            raise ValueError(f"LogitNormal density needs std > 0, got {std}")
        if not shift > 0:
            raise ValueError(f"LogitNormal density needs shift > 0, got {shift}")
        super().__init__(**kw)
        self.mean, self.std, self.shift = float(mean), float(std), float(shift)

    def sample_t(self, u):
        t = torch.sigmoid(self.mean + self.std * _ndtri(u))
        if self.shift != 1.0:  # shift = 1 keeps the unshifted computation bit for bit
            t = self.shift * t / (1.0 + (self.shift - 1.0) * t)
        return t

    def log_prob_t(self, t):
        # logit-normal in logit t − ln shift, times the Jacobian 1/(t(1 − t)) of logit
        z = torch.log(t) - torch.log1p(-t)
        return _normal_logpdf(z - math.log(self.shift), self.mean, self.std) - torch.log(t) - torch.log1p(-t)

    def __repr__(self):
        return (f"LogitNormal(mean={self.mean}, std={self.std}, shift={self.shift}"
                f"{self._path_repr()}{self._imp_repr()})")


class UShaped(TDensity):
    """RF++ U-shaped density p(t) = a·cosh(a(t − ½)) / (2 sinh(a/2)), a = 4 (Lee et al. 2024,
    "Improving the Training of Rectified Flows", arXiv 2405.20320: p(t) ∝ cosh(a(t − ½)), a = 4;
    their t convention is symmetric about ½, so it is unaffected by which end is noise).

    CDF F(t) = (sinh(a(t − ½)) + sinh(a/2)) / (2 sinh(a/2)), inverted in closed form:
    t = ½ + asinh((2u − 1)·sinh(a/2)) / a (exactly 0 and 1 at u = 0, 1).
    Oracles (a = 4): p(0) = p(1) = 2·coth 2 = 2.0746, p(½) = 2/sinh 2 = 0.5514.
    """

    name = "u_shaped"

    def __init__(self, a: float = 4.0, **kw):
        if not a > 0:
            raise ValueError(f"u_shaped density needs a > 0, got {a}")
        super().__init__(**kw)
        self.a = float(a)

    def sample_t(self, u):
        return (0.5 + torch.asinh((2.0 * u - 1.0) * math.sinh(0.5 * self.a)) / self.a).clamp(0.0, 1.0)

    def log_prob_t(self, t):
        lp = math.log(self.a / (2.0 * math.sinh(0.5 * self.a))) + torch.log(torch.cosh(self.a * (t - 0.5)))
        return torch.where((t >= 0) & (t <= 1), lp, -math.inf)

    def cdf(self, t):
        s = math.sinh(0.5 * self.a)
        return (torch.sinh(self.a * (t - 0.5)) + s) / (2.0 * s)

    def __repr__(self):
        return f"UShaped(a={self.a}{self._path_repr()}{self._imp_repr()})"


class Cosine(LogSNRDensity):
    """λ = −2 ln tan(πu/2): the λ-density of the VP-cosine schedule with uniform t (Nichol &
    Dhariwal 2021, eq. 17 without offset; Salimans & Ho 2022, sec. 2), usable on any path.
    p(λ) = sech(λ/2) / (2π). Oracle: P(|λ| > 3) = 27.95%.
    """

    name = "cosine"

    def logsnr(self, u):
        # λ = 2(ln cos(πu/2) − ln sin(πu/2)); cos written as sin(π(1 − u)/2) so u → 1 is exact
        cos, sin = torch.sin(0.5 * math.pi * (1.0 - u)), torch.sin(0.5 * math.pi * u)
        lam = 2.0 * (torch.log(cos) - torch.log(sin))
        return lam.clamp(-LOGSNR_MAX, LOGSNR_MAX)

    def log_prob(self, lam):
        # log sech(x) = −|x| − log1p(e^{−2|x|}) + log 2
        x = 0.5 * lam.abs()
        return -x - torch.log1p(torch.exp(-2.0 * x)) + math.log(2.0) - math.log(2.0 * math.pi)

    def __repr__(self):
        return f"Cosine({self._imp_repr().lstrip(', ')})"


class Laplace(LogSNRDensity):
    """Laplace(μ, b) in log-SNR: Hang & Gu 2024, "Improved Noise Schedule for Diffusion Training"
    (arXiv 2407.03297), sec. 3, p(λ) = exp(−|λ − μ|/b) / (2b), defaults μ = 0, b = 0.5.

    Inverse CDF: λ(u) = μ − b·sgn(0.5 − u)·ln(1 − 2|u − 0.5|) (decreasing in u); u = 0 gives
    λ = +inf, clamped to +LOGSNR_MAX. Oracles (μ = 0, b = 0.5): λ(0.25) = 0.346574,
    λ(0.1) = 0.804719, P(|λ| > 3) = e^{−6} = 0.25%.
    """

    name = "laplace"

    def __init__(self, mu: float = 0.0, b: float = 0.5, **kw):
        if not b > 0:
            raise ValueError(f"laplace density needs b > 0, got {b}")
        super().__init__(**kw)
        self.mu, self.b = float(mu), float(b)

    def logsnr(self, u):
        d = u - 0.5
        lam = self.mu - self.b * torch.sign(-d) * torch.log1p(-2.0 * d.abs())
        return lam.clamp(-LOGSNR_MAX, LOGSNR_MAX)

    def log_prob(self, lam):
        return -(lam - self.mu).abs() / self.b - math.log(2.0 * self.b)

    def cdf(self, lam):
        z = (lam - self.mu) / self.b
        return torch.where(z < 0, 0.5 * torch.exp(z), 1.0 - 0.5 * torch.exp(-z))

    def __repr__(self):
        return f"Laplace(mu={self.mu}, b={self.b}{self._imp_repr()})"


class EDM(LogSNRDensity):
    """EDM training noise levels: ln σ ~ N(P_mean, P_std²), P_mean = −1.2, P_std = 1.2 (Karras et
    al. 2022, table 1 "training"/sec. 5). σ is EDM's noise level σ²= σ_path²/α_path² = 1/SNR, so
    λ = −2 ln σ ~ N(−2 P_mean, (2 P_std)²). Sampled as ln σ = P_mean + P_std·Φ⁻¹(u).
    """

    name = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, **kw):
        if not p_std > 0:
            raise ValueError(f"edm density needs p_std > 0, got {p_std}")
        super().__init__(**kw)
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def logsnr(self, u):
        return (-2.0 * (self.p_mean + self.p_std * _ndtri(u))).clamp(-LOGSNR_MAX, LOGSNR_MAX)

    def log_prob(self, lam):
        return _normal_logpdf(lam, -2.0 * self.p_mean, 2.0 * self.p_std)

    def __repr__(self):
        return f"EDM(p_mean={self.p_mean}, p_std={self.p_std}{self._imp_repr()})"


DENSITIES = {
    "uniform": Uniform,
    "logit_normal": LogitNormal,
    "u_shaped": UShaped,
    "cosine": Cosine,
    "laplace": Laplace,
    "edm": EDM,
}
