"""Noising paths, the discrete-DDPM adapter and training densities."""
import math

import pytest
import torch

from difftrain.diffusion.densities import DENSITIES, LogitNormal, LogSNRDensity, Uniform
from difftrain.diffusion.paths import LOGSNR_MAX, PATHS, DiscreteDDPM, RectifiedFlow, VPCosine, VPLinear

F64 = torch.float64
ALL_PATHS = [VPCosine(), VPLinear(), RectifiedFlow(), DiscreteDDPM.linear()]
IDS = ["vp_cosine", "vp_linear", "rf", "ddpm_discrete"]


def test_registry():
    assert set(PATHS) == {"vp_cosine", "vp_linear", "rf"}
    for name, cls in PATHS.items():
        assert cls().name == name


@pytest.mark.parametrize("path", ALL_PATHS, ids=IDS)
def test_logsnr_roundtrip(path):
    t = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=F64)
    assert torch.allclose(path.t_from_logsnr(path.logsnr(t)), t, rtol=0, atol=1e-10)
    lam = path.logsnr(t)
    assert bool((lam[1:] < lam[:-1]).all()), "λ must decrease in t"
    lam = torch.linspace(float(lam.min()), float(lam.max()), 501, dtype=F64)
    assert torch.allclose(path.logsnr(path.t_from_logsnr(lam)), lam, rtol=0, atol=1e-8)


@pytest.mark.parametrize("path", ALL_PATHS, ids=IDS)
def test_logsnr_matches_alpha_sigma(path):
    t = torch.linspace(0.01, 0.99, 99, dtype=F64)
    a, s = path.alpha(t), path.sigma(t)
    assert torch.allclose(path.logsnr(t), torch.log(a**2 / s**2), atol=1e-9)


@pytest.mark.parametrize("path", [VPCosine(), VPLinear(), DiscreteDDPM.linear()], ids=["cos", "lin", "ddpm"])
def test_vp_is_variance_preserving(path):
    t = torch.linspace(0, 1, 1001, dtype=F64)
    a, s = path.alpha(t), path.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), atol=1e-12)
    lam = path.logsnr(t[1:-1])
    assert torch.allclose(a[1:-1] ** 2, torch.sigmoid(lam), atol=1e-12)
    assert torch.allclose(s[1:-1] ** 2, torch.sigmoid(-lam), atol=1e-12)


@pytest.mark.parametrize("path", ALL_PATHS, ids=IDS)
def test_derivatives_match_finite_differences(path):
    # midpoints between the DDPM adapter's knots (its λ is piecewise linear)
    t = (torch.arange(50, 950, 37, dtype=F64) + 0.5) / 1000
    h = 1e-7
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ALL_PATHS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_endpoints_are_finite(path, dtype):
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    for f in (path.alpha, path.sigma, path.logsnr, path.d_alpha, path.d_sigma):
        out = f(t)
        assert out.dtype == dtype and bool(torch.isfinite(out).all()), f
    lam = path.logsnr(t)
    assert float(lam[0]) == LOGSNR_MAX and float(lam[1]) < 0
    assert path.t_from_logsnr(torch.tensor([LOGSNR_MAX + 5, -LOGSNR_MAX - 5], dtype=dtype)).isfinite().all()


@pytest.mark.parametrize("path", [VPCosine(), RectifiedFlow()], ids=["cos", "rf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_ends(path, dtype):
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    assert path.alpha(t).tolist() == [1.0, 0.0]
    assert path.sigma(t).tolist() == [0.0, 1.0]
    assert float(path.logsnr(t)[1]) == -LOGSNR_MAX


def test_oracles():
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    assert abs(float(VPCosine().logsnr(torch.tensor(0.5, dtype=F64)))) < 1e-14
    assert torch.allclose(VPCosine().logsnr(t), -2 * torch.log(torch.tan(math.pi * t / 2)), atol=1e-12)
    assert torch.allclose(RectifiedFlow().logsnr(t), 2 * torch.log((1 - t) / t), atol=1e-12)
    # VP-SDE marginal (Song et al. 2021, eq. 33): log α = −¼ t² (β1 − β0) − ½ t β0
    lin = VPLinear()
    assert torch.allclose(torch.log(lin.alpha(t)), -0.25 * t**2 * 19.9 - 0.5 * t * 0.1, atol=1e-14)


def test_discrete_ddpm_adapter():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    p = DiscreteDDPM(betas)
    abar = torch.cumprod(1 - betas, 0)
    i = torch.arange(1000)
    t = p.t_from_timestep(i)
    assert torch.allclose(t, (i + 1).to(F64) / 1000.0)
    assert torch.allclose(p.timestep(t), i.to(F64))
    assert torch.allclose(p.alpha(t) ** 2, abar, rtol=1e-10, atol=0)
    assert float(p.logsnr(torch.tensor(0.0, dtype=F64))) == LOGSNR_MAX
    # the continuous VP-linear path is this table's N → ∞ limit
    tt = torch.linspace(0.05, 0.95, 19, dtype=F64)
    assert torch.allclose(p.alpha(tt), VPLinear().alpha(tt), atol=2e-3)
    sd = DiscreteDDPM.scaled_linear()
    assert sd.n == 1000 and abs(float(sd.betas[-1]) - 0.012) < 1e-12
    with pytest.raises(ValueError):
        DiscreteDDPM([0.5, 1.5])


# ---- densities -------------------------------------------------------------------------------
def _grid_u(n=200_000):
    return (torch.arange(n, dtype=F64) + 0.5) / n


def test_logit_normal_quantile_oracle():
    t = LogitNormal().t(_grid_u(), RectifiedFlow())
    assert abs(float((t < 0.25).double().mean()) - 0.1360) < 5e-4
    assert abs(float(t.median()) - 0.5) < 1e-5
    t0 = LogitNormal().t(torch.tensor([0.0, 0.5]), RectifiedFlow())
    assert t0.tolist() == [0.0, 0.5]


def test_uniform_density():
    u = _grid_u(1000)
    t = Uniform(0.2, 0.6).t(u, VPCosine())
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.6
    assert abs(float(t.mean()) - 0.4) < 1e-12
    with pytest.raises(ValueError):
        Uniform(0.5, 0.1)
    assert {"uniform", "logit_normal"} <= set(DENSITIES)


def test_logsnr_density_maps_through_path():
    class Const(LogSNRDensity):
        def logsnr(self, u):
            return torch.zeros_like(u)

    u = torch.rand(8, dtype=F64)
    assert torch.allclose(Const().t(u, VPCosine()), torch.full_like(u, 0.5))
    assert torch.allclose(Const().t(u, RectifiedFlow()), torch.full_like(u, 0.5))
