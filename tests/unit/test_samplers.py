"""Samplers converge at their theoretical order on a Gaussian problem with a known PF-ODE solution.

Data x0 ~ N(0, diag(s²)). Then x_t ~ N(0, v_t) per dimension with v_t = α_t² s² + σ_t², the exact
denoiser is E[x0 | x_t] = α_t s² x / v_t and ε̂ = σ_t x / v_t, so the PF-ODE drift is
α'·x̂0 + σ'·ε̂ = x·(α α' s² + σ σ')/v_t = x·v_t'/(2 v_t), whose solution is
x_t = x_r·sqrt(v_t / v_r) (for r = 1: x_0 = x_1·sqrt(v_0)/sqrt(v_1), since v_1 = 1 on these paths).
"""
import math

import numpy as np
import pytest
import torch

from difftrain.diffusion.paths import PATHS, RectifiedFlow, VPCosine, VPLinear
from difftrain.diffusion.samplers import SAMPLERS, STOCHASTIC, time_grid

F64 = torch.float64
S = torch.linspace(0.5, 1.5, 16, dtype=F64)  # per-dimension data std
ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2}
ODE = sorted(set(SAMPLERS) - set(STOCHASTIC))  # the consistency samplers re-noise: tests/unit/test_consistency.py


def _variance(path, t):
    return path.alpha(t) ** 2 * S**2 + path.sigma(t) ** 2


def _exact_denoiser(path):
    def denoise(x, t):
        assert t.shape == (x.shape[0],)
        a = path.alpha(t).to(x.dtype)[:, None]
        return a * S.to(x.dtype) ** 2 * x / _variance(path, t.to(x.dtype)[:, None])

    return denoise


@pytest.mark.parametrize("path_name", ["vp_cosine", "rf"])
@pytest.mark.parametrize("name", ODE)
def test_convergence_order(path_name, name):
    path, delta = PATHS[path_name](), 0.02
    t_hi, t_lo = torch.tensor(1 - delta, dtype=F64), torch.tensor(delta, dtype=F64)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=F64) * _variance(path, t_hi).sqrt()
    exact = x * (_variance(path, t_lo) / _variance(path, t_hi)).sqrt()
    steps = [8, 16, 32, 64]
    errs = []
    for n in steps:
        out = SAMPLERS[name](_exact_denoiser(path), x, time_grid(n, 1 - delta, delta), path=path)
        errs.append(float((out - exact).norm()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - ORDER[name]) <= 0.35, (errs, slope)


@pytest.mark.parametrize("path", [VPCosine(), RectifiedFlow(), VPLinear()], ids=["cos", "rf", "lin"])
@pytest.mark.parametrize("name", ODE)
def test_full_range_endpoints(path, name):
    """From t = 1 (pure noise on cos/rf) to t = 0: finite, and close to the exact ODE solution."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    one, zero = torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64)
    exact = x * (_variance(path, zero) / _variance(path, one)).sqrt()
    grid = time_grid(200, path=path)
    out = SAMPLERS[name](_exact_denoiser(path), x, grid, path=path)
    assert torch.isfinite(out).all()
    assert float((out - exact).abs().max()) < 0.05
    # the last step lands on the final data prediction
    den = _exact_denoiser(path)
    t_prev = grid[-2].expand(4)
    seen = []
    SAMPLERS[name](lambda y, t: seen.append((y, t)) or den(y, t), x, grid, path=path)
    y_last, t_last = seen[-1]
    assert torch.equal(t_last, t_prev)
    assert torch.allclose(out, den(y_last, t_last), atol=1e-14)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_float32_and_t_batch(name):
    path = VPCosine()
    x = torch.randn(3, 2, 4, 4)
    ts_seen = []

    def denoise(y, t):
        ts_seen.append(t)
        assert y.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == (3,)
        return 0.5 * y * path.alpha(t).view(-1, 1, 1, 1)

    out = SAMPLERS[name](denoise, x, time_grid(5, path=path, kind="logsnr", t_end=1e-3), path=path)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    nfe = {"heun": 10}.get(name, 5)
    assert len(ts_seen) == nfe


def test_time_grid():
    g = time_grid(4)
    assert g.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    path = VPCosine()
    g = time_grid(10, 0.999, 0.001, path=path, kind="logsnr")
    assert g[0] == 0.999 and g[-1] == 0.001 and bool((g[1:] < g[:-1]).all())
    dl = torch.diff(path.logsnr(g))
    assert torch.allclose(dl, dl.mean().expand_as(dl), atol=1e-9)
    with pytest.raises(ValueError):
        time_grid(4, kind="logsnr")
    with pytest.raises(ValueError):
        time_grid(4, kind="karras")
    with pytest.raises(ValueError):
        time_grid(0)


def test_bad_grids_rejected():
    x = torch.randn(2, 3)
    for ts in (torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.0, -0.1])):
        with pytest.raises(ValueError):
            SAMPLERS["euler"](lambda y, t: y, x, ts, path=RectifiedFlow())


def test_progress_bar_runs():
    x = torch.randn(2, 3)
    out = SAMPLERS["ddim"](lambda y, t: 0 * y, x, time_grid(3), path=RectifiedFlow(), progress=True)
    assert torch.equal(out, torch.zeros_like(x))


def test_rf_euler_equals_ddim():
    """On rectified flow, Euler in t and DDIM are the same update (known identity)."""
    path = RectifiedFlow()
    x = torch.randn(4, 16, dtype=F64)
    den = _exact_denoiser(path)
    a = SAMPLERS["euler"](den, x, time_grid(7), path=path)
    b = SAMPLERS["ddim"](den, x, time_grid(7), path=path)
    assert torch.allclose(a, b, atol=1e-12) and not math.isnan(float(a.sum()))


@pytest.mark.parametrize("name", ODE)
def test_eps_model_from_pure_noise_needs_the_pixel_clip(name):
    """An eps prediction at t = 1 (α = 0) gives no x̂0: unclipped, any error blows up the first step; the pixel-space
    clip of ``Diffusion.sample_x0`` keeps every sampler finite and in range from the exact eps model of data
    in [-1, 1] (here ±0.5 per dimension, with a 1e-3 error), and is a no-op for other targets."""
    from difftrain.config import DiffusionConfig
    from difftrain.diffusion.diffusion import build_diffusion

    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))

    def eps_model(x, t, cond=None):  # E[ε | x_t] for x0 uniform on {-0.5, 0.5}^8, plus a trained model's small error
        path = VPCosine()
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        w = torch.tanh(a * 0.5 * x / s.clamp_min(1e-12) ** 2)  # E[x0 | x_t] / 0.5 per dimension
        return (x - a * 0.5 * w) / s.clamp_min(1e-12) + 1e-3 * torch.sin(3 * x)

    grid = time_grid(10).float()
    for pixel, finite in ((True, True), (False, False)):
        diff = build_diffusion(DiffusionConfig(path="vp_cosine", target="eps"), pixel_space=pixel)
        out = SAMPLERS[name](diff.denoiser(eps_model), x_T, grid, path=diff.path)
        assert bool(torch.isfinite(out).all() and out.abs().max() < 1e3) == finite, (pixel, out.abs().max())
        if finite:
            assert float(out.abs().max()) <= 1.0
            # lands near the data's support (the exact denoiser, 10 steps)
            assert float((out.abs() - 0.5).abs().mean()) < 0.1
    assert build_diffusion(DiffusionConfig(path="vp_cosine", target="v"), pixel_space=True).x0_clip == 0.0
