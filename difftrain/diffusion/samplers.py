"""Stateless ODE samplers with one signature (k-diffusion style, in the path's t).

    sample(denoise_fn, x_T, ts, *, path, progress=False) -> x

``denoise_fn(x, t_batch) -> x̂0`` is a data prediction; ``t_batch`` has shape [B] and dtype
float32 (float64 when x is float64). ``ts`` is a decreasing 1-D tensor t_0 > t_1 > … > t_n (from ~1
to ~0); a sampler integrates the probability-flow ODE from ts[0] to ts[-1] in n steps and returns
x at ts[-1]. The PF-ODE on a path x = α·x0 + σ·ε is

    dx/dt = α'·x̂0 + σ'·ε̂,   ε̂ = (x − α·x̂0)/σ                  (Song et al. 2021, eq. 13)

Endpoints. At t = 1 on VP-cosine / RF, α = 0 and σ = 1 so ε̂ = x: no division problem. If ts[-1]
has σ = 0 (t = 0, data), every sampler's last step is the DDIM step x = α(t_n)·x̂0(x_{n−1},
t_{n−1}), i.e. it returns the last x0 prediction (= x̂0 exactly on VP-cosine / RF). That is also
what Euler in Karras's σ-space, first-order DPM-Solver++ and Karras Alg. 1 do there; for Euler-in-t
on VP paths it replaces a step that would not land on the data. ts must not *start* at σ = 0.

Multistep consistency sampling (``consistency``, ``lcm``, ``consistency_edm``: Song et al. 2023, Alg. 1) is not an
ODE solver: at each t_i it maps x to the consistency function's data estimate and re-noises it to t_{i+1} with fresh
noise (``noise(i)``, keyed per image by ``sampling.generate``).

NFE: euler, ddim, dpmpp_2m and the consistency samplers use n evaluations; heun 2n (2n − 1 when ts[-1] is t = 0).
Coefficients are computed from ts in float64 on the CPU, then cast to x's dtype and device.
"""
from __future__ import annotations

import torch

from difftrain.diffusion.consistency import boundary_coefficients
from difftrain.diffusion.paths import Path


def ddim_update(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s):
    """Deterministic DDIM (Song et al. 2021, "DDIM", eq. 12 with eta = 0), from the path coefficients:

        eps^ = (x_t - alpha_t x0^) / sigma_t,   x_s = alpha_s x0^ + sigma_s eps^

    Where sigma_s = 0 (s = 0, data) the result is alpha_s x0^ exactly (the eps^ term is dropped, not multiplied by
    0, so sigma_t = 0 there gives no NaN). On rectified flow (alpha = 1 - t, sigma = t) this is the Euler step of
    the velocity eps^ - x0^. Coefficients broadcast against x (0-d tensors or per-sample [B, 1, ...]).
    """
    ax0 = alpha_s * x0_hat
    x_s = ax0 + sigma_s * ((x_t - alpha_t * x0_hat) / sigma_t)
    return torch.where(sigma_s == 0, ax0, x_s)



def ode_step(x0_fn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, path: Path, solver: str = "ddim"):
    """One step of the probability-flow ODE from t to s < t per sample (t, s: [B]), from a data prediction
    ``x0_fn(x, t) -> x0^``: consistency distillation's teacher step (CM Alg. 2; LCM's skipping-step solver when s is
    k timesteps below t). ``ddim``: x_s = alpha_s x0^ + sigma_s eps^ (``samplers.ddim_update``); ``heun``: Euler
    predictor and trapezoidal corrector in t (Karras et al. 2022, Alg. 1; two evaluations), first order where
    sigma_s = 0 as there. Arithmetic in x's dtype (float64 in the stage)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    t_, s_ = t.to(x).reshape(shape), s.to(x).reshape(shape)
    a_t, sg_t, a_s, sg_s = path.alpha(t_), path.sigma(t_), path.alpha(s_), path.sigma(s_)
    x0 = x0_fn(x, t)
    x_ddim = ddim_update(x0, x, a_t, sg_t, a_s, sg_s)
    if solver == "ddim":
        return x_ddim
    if solver != "heun":
        raise ValueError(f"unknown teacher ODE step '{solver}'; valid: ddim, heun")
    d = path.d_alpha(t_) * x0 + path.d_sigma(t_) * (x - a_t * x0) / sg_t
    x_pred = x + (s_ - t_) * d
    x0_pred = x0_fn(x_pred, s)
    safe = torch.where(sg_s > 0, sg_s, torch.ones_like(sg_s))
    d_next = path.d_alpha(s_) * x0_pred + path.d_sigma(s_) * (x_pred - a_s * x0_pred) / safe
    return torch.where(sg_s > 0, x + 0.5 * (s_ - t_) * (d + d_next), x_ddim)



class _Grid:
    """Per-time path coefficients for a grid, as 0-d tensors in x's dtype/device."""

    def __init__(self, ts: torch.Tensor, path: Path, like: torch.Tensor):
        ts64 = torch.as_tensor(ts).detach().to("cpu", torch.float64)
        if ts64.ndim != 1 or ts64.numel() < 2:
            raise ValueError("ts must be a 1-D tensor with at least 2 times")
        if not bool((ts64[1:] < ts64[:-1]).all()):
            raise ValueError("ts must be strictly decreasing (from noise to data)")
        self.n = ts64.numel() - 1
        sig = path.sigma(ts64)
        if sig[0] == 0:
            raise ValueError("ts must not start at a time where sigma = 0")
        self.at_data = (sig == 0).tolist()  # host-side flags: no device sync per step
        self.ends_at_data = self.at_data[-1]
        cast = dict(device=like.device, dtype=like.dtype)
        self.t = ts64.to(**cast)
        self.alpha, self.sigma = path.alpha(ts64).to(**cast), sig.to(**cast)
        self.d_alpha, self.d_sigma = path.d_alpha(ts64).to(**cast), path.d_sigma(ts64).to(**cast)
        self.lam = path.logsnr(ts64).to(**cast)
        t_dtype = torch.promote_types(like.dtype, torch.float32)
        self._t_model = ts64.to(device=like.device, dtype=t_dtype)
        self._batch = like.shape[0]

    def t_batch(self, i: int) -> torch.Tensor:
        return self._t_model[i].expand(self._batch)

    def eps(self, x, x0, i):
        return (x - self.alpha[i] * x0) / self.sigma[i]

    def velocity(self, x, x0, i):
        """PF-ODE drift α'·x̂0 + σ'·ε̂ at grid point i."""
        return self.d_alpha[i] * x0 + self.d_sigma[i] * self.eps(x, x0, i)

    def ddim(self, x, x0, i, j):
        """x_j = α_j·x̂0 + σ_j·ε̂ (Song et al. 2021, DDIM eq. 12 with η = 0; ``ddim_update``)."""
        return ddim_update(x0, x, self.alpha[i], self.sigma[i], self.alpha[j], self.sigma[j])


def _steps(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc="sampling", leave=False)


@torch.no_grad()
def euler(denoise_fn, x_T, ts, *, path: Path, progress: bool = False):
    """Explicit Euler on the PF-ODE in t: x_{i+1} = x_i + (t_{i+1} − t_i)·f(x_i, t_i). Order 1."""
    g, x = _Grid(ts, path, x_T), x_T
    for i in _steps(g.n, progress):
        x0 = denoise_fn(x, g.t_batch(i))
        if i == g.n - 1 and g.ends_at_data:
            x = g.ddim(x, x0, i, i + 1)
        else:
            x = x + (g.t[i + 1] - g.t[i]) * g.velocity(x, x0, i)
    return x


@torch.no_grad()
def heun(denoise_fn, x_T, ts, *, path: Path, progress: bool = False):
    """Heun's method (Karras et al. 2022, Alg. 1) on the PF-ODE in t. Order 2.

    Euler predictor, trapezoidal corrector; the step to σ = 0 stays first order (Alg. 1 line 7).
    """
    g, x = _Grid(ts, path, x_T), x_T
    for i in _steps(g.n, progress):
        h = g.t[i + 1] - g.t[i]
        x0 = denoise_fn(x, g.t_batch(i))
        if i == g.n - 1 and g.ends_at_data:
            x = g.ddim(x, x0, i, i + 1)
            continue
        d = g.velocity(x, x0, i)
        x_pred = x + h * d
        d_next = g.velocity(x_pred, denoise_fn(x_pred, g.t_batch(i + 1)), i + 1)
        x = x + 0.5 * h * (d + d_next)
    return x


@torch.no_grad()
def ddim(denoise_fn, x_T, ts, *, path: Path, progress: bool = False):
    """Deterministic DDIM (Song et al. 2021, "DDIM", eq. 12, η = 0): x_s = α_s·x̂0 + σ_s·ε̂.

    Equals Euler in (σ/α, x/α) and first-order DPM-Solver++. Order 1.
    """
    g, x = _Grid(ts, path, x_T), x_T
    for i in _steps(g.n, progress):
        x = g.ddim(x, denoise_fn(x, g.t_batch(i)), i, i + 1)
    return x


@torch.no_grad()
def dpmpp_2m(denoise_fn, x_T, ts, *, path: Path, progress: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2), data prediction, in λ.

    With Lu's half-log-SNR ℓ = λ/2 and h_i = ℓ_i − ℓ_{i−1}:
        x_i = (σ_i/σ_{i−1})·x_{i−1} − α_i·(e^{−h_i} − 1)·D_i,
        D_i = (1 + 1/(2r_i))·x̂0_{i−1} − 1/(2r_i)·x̂0_{i−2},  r_i = h_{i−1}/h_i,
    first step and the step to σ = 0 with D_i = x̂0_{i−1} (first order). e^{−h} is computed as
    σ_i·α_{i−1}/(α_i·σ_{i−1}), which is exactly 0 when α_{i−1} = 0 (t = 1) and needs no clamped λ.
    Valid for any path (the exponential integrator only uses α, σ). Order 2.
    """
    g, x = _Grid(ts, path, x_T), x_T
    x0_prev = None
    for i in _steps(g.n, progress):
        j = i + 1
        x0 = denoise_fn(x, g.t_batch(i))
        if x0_prev is None or (j == g.n and g.ends_at_data):
            d = x0
        else:
            r = (g.lam[i] - g.lam[i - 1]) / (g.lam[j] - g.lam[i])
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        if g.at_data[j]:
            x = g.alpha[j] * d
        else:
            exp_neg_h = g.sigma[j] * g.alpha[i] / (g.alpha[j] * g.sigma[i])
            x = (g.sigma[j] / g.sigma[i]) * x + g.alpha[j] * (1 - exp_neg_h) * d
        x0_prev = x0
    return x


@torch.no_grad()
def consistency(denoise_fn, x_T, ts, *, path: Path, progress: bool = False, boundary: str = "none", noise=None):
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1; LCM, Luo et al. 2023, Alg. 3):
    x0 = f(x, t_i) = a(t_i)·x + b(t_i)·x̂0(x, t_i) (``consistency.boundary_coefficients``), then
    x = α(t_{i+1})·x0 + σ(t_{i+1})·z_i with fresh noise z_i = ``noise(i)`` (``torch.randn_like`` when None); the
    last step returns x0 when ts[-1] has σ = 0. One evaluation per step; one step is the one-step generator f(x_T, 1).
    """
    g, x = _Grid(ts, path, x_T), x_T
    a, b = (c.to(g.t) for c in boundary_coefficients(boundary, torch.as_tensor(ts).detach().cpu().double(), path))
    for i in _steps(g.n, progress):
        x0 = a[i] * x + b[i] * denoise_fn(x, g.t_batch(i))
        if g.at_data[i + 1]:
            x = g.alpha[i + 1] * x0
        else:
            z = noise(i) if noise is not None else torch.randn_like(x)
            x = g.alpha[i + 1] * x0 + g.sigma[i + 1] * z.to(x)
    return x


def _consistency(boundary: str):
    def sample(denoise_fn, x_T, ts, *, path: Path, progress: bool = False, noise=None):
        return consistency(denoise_fn, x_T, ts, path=path, progress=progress, boundary=boundary, noise=noise)

    sample.__doc__ = f"Multistep consistency sampling with the '{boundary}' boundary scalings (``consistency``)."
    return sample


SAMPLERS = {"euler": euler, "heun": heun, "ddim": ddim, "dpmpp_2m": dpmpp_2m,
            "consistency": _consistency("none"), "lcm": _consistency("lcm"), "consistency_edm": _consistency("edm")}
STOCHASTIC = ("consistency", "lcm", "consistency_edm")  # they take ``noise=`` (fresh noise per step)


def time_grid(
    n: int,
    t_start: float = 1.0,
    t_end: float = 0.0,
    path: Path | None = None,
    kind: str = "uniform",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """n steps = n + 1 decreasing times from t_start to t_end (both included exactly).

    ``"uniform"``: uniform in t. ``"logsnr"``: uniform in λ between λ(t_start) and λ(t_end)
    (Lu et al. 2022, sec. 3.3), mapped back through ``path.t_from_logsnr``; needs ``path``. λ is
    clamped to ±30 at t ∈ {0, 1}, so a logsnr grid ending at 0 spends steps at absurd SNRs —
    end it at the training t_min (the last state then carries noise σ(t_min), ~1e-4) instead.
    """
    if n < 1 or not t_start > t_end:
        raise ValueError(f"time_grid needs n >= 1 and t_start > t_end, got {n}, {t_start}, {t_end}")
    if kind == "uniform":
        ts = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
    elif kind == "logsnr":
        if path is None:
            raise ValueError("time_grid(kind='logsnr') needs a path")
        ends = path.logsnr(torch.tensor([t_start, t_end], dtype=torch.float64))
        ts = path.t_from_logsnr(torch.linspace(float(ends[0]), float(ends[1]), n + 1, dtype=torch.float64))
        ts[0], ts[-1] = t_start, t_end
    else:
        raise ValueError(f"unknown time grid '{kind}'; valid: uniform, logsnr")
    return ts.to(dtype)
