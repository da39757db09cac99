"""t densities (uniform, logit-normal + shift, RF++ U-shaped, cosine, Laplace, EDM), importance
weights and loss weightings — oracles from shared/REFERENCES.md sections A and C."""
import math

import pytest
import torch
from scipy import stats

from difftrain.config import ConfigError, DiffusionConfig
from difftrain.config_checks import load_config
from difftrain.diffusion.densities import (
    DENSITIES, EDM, Cosine, Density, Laplace, LogitNormal, LogSNRDensity, UShaped, Uniform,
)
from difftrain.diffusion.diffusion import Diffusion, build_diffusion
from difftrain.diffusion.paths import PATHS, RectifiedFlow, VPCosine, VPLinear
from difftrain.diffusion.targets import TARGETS, target
from difftrain.diffusion.weightings import SD3, WEIGHTINGS, MinSNR, TruncatedSNR

F64 = torch.float64


def _grid_u(n=200_000):
    return (torch.arange(n, dtype=F64) + 0.5) / n


def _rand_u(n=20_000, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- Laplace (Hang & Gu 2024) ---------------------------------------------------------------
def test_laplace_oracles():
    d = Laplace()
    u = torch.tensor([0.5, 0.25, 0.1, 0.01, 1 / 1001], dtype=F64)
    want = torch.tensor([0.0, 0.346574, 0.804719, 1.956012, 3.107804], dtype=F64)
    assert torch.allclose(d.logsnr(u), want, atol=1e-6)
    g = _grid_u(10_001)
    lam = d.logsnr(g)
    assert torch.allclose(lam, -d.logsnr(1.0 - g), atol=1e-9)  # odd about 0.5
    assert bool((lam[1:] < lam[:-1]).all())  # decreasing
    # VP path: α² = sigmoid(λ) at the oracle points
    t = d.t(torch.tensor([0.5, 0.25], dtype=F64), VPCosine())
    assert torch.allclose(VPCosine().alpha(t) ** 2, torch.tensor([0.5, 0.585786], dtype=F64), atol=1e-6)
    # guards: u ∈ {0, 1} give finite, clamped λ
    assert torch.isfinite(d.logsnr(torch.tensor([0.0, 1.0], dtype=F64))).all()


def test_laplace_ks_and_tails():
    d = Laplace()
    lam = d.logsnr(_rand_u()).numpy()
    assert stats.kstest(lam, stats.laplace(loc=0.0, scale=0.5).cdf).pvalue > 0.01
    assert stats.kstest(Laplace(mu=1.0, b=2.0).logsnr(_rand_u(seed=1)).numpy(),
                        stats.laplace(loc=1.0, scale=2.0).cdf).pvalue > 0.01
    g = _grid_u()
    p_lap = float((d.logsnr(g).abs() > 3).double().mean())
    p_cos = float((Cosine().logsnr(g).abs() > 3).double().mean())
    assert abs(p_lap - math.exp(-6)) < 1e-4 and abs(p_lap - 0.0025) < 1e-4
    assert abs(p_cos - 0.2795) < 1e-4


def test_cosine_is_vp_cosine_uniform():
    u = _grid_u(1001)
    assert torch.allclose(Cosine().t(u, VPCosine()), u, atol=1e-12)
    # its log-density integrates to 1
    lam = torch.linspace(-40, 40, 200_001, dtype=F64)
    assert abs(float(torch.trapezoid(Cosine().log_prob(lam).exp(), lam)) - 1.0) < 1e-6


# ---- logit-normal (SD3) -----------------------------------------------------------------------
def test_logit_normal_oracle_and_shift():
    t = LogitNormal().t(_grid_u(), RectifiedFlow())
    assert abs(float((t < 0.25).double().mean()) - 0.1360) < 5e-4
    t3 = LogitNormal(shift=3.0).t(_grid_u(), RectifiedFlow())
    # Esser et al. eq. 23 applied to the unshifted draws
    assert torch.allclose(t3, 3.0 * t / (1.0 + 2.0 * t), atol=1e-15)
    # shift moves the median to 3/(1 + 2·0.5) = 0.75
    assert abs(float(t3.median()) - 0.75) < 1e-5
    # its density (logit t − ln shift is N(m, s²)) matches the sampled mass
    tt = torch.linspace(0.5, 0.9, 4001, dtype=F64)
    mass = float(torch.trapezoid(LogitNormal(shift=3.0).log_prob_t(tt).exp(), tt))
    assert abs(mass - float(((t3 >= 0.5) & (t3 <= 0.9)).double().mean())) < 1e-4
    with pytest.raises(ValueError):
        LogitNormal(shift=0.0)


# ---- RF++ U-shaped ----------------------------------------------------------------------------
def test_u_shaped_oracles_and_ks():
    d = UShaped()
    p = d.log_prob_t(torch.tensor([0.0, 1.0, 0.5], dtype=F64)).exp()
    assert torch.allclose(p, torch.tensor([2.0746, 2.0746, 0.5514], dtype=F64), atol=1e-4)
    tt = torch.linspace(0, 1, 100_001, dtype=F64)
    assert abs(float(torch.trapezoid(d.log_prob_t(tt).exp(), tt)) - 1.0) < 1e-8
    assert d.sample_t(torch.tensor([0.0, 0.5, 1.0], dtype=F64)).tolist() == [0.0, 0.5, 1.0]
    t = d.t(_rand_u(), RectifiedFlow())
    assert stats.kstest(t.numpy(), lambda x: d.cdf(torch.as_tensor(x)).numpy()).pvalue > 0.01


# ---- EDM --------------------------------------------------------------------------------------
def test_edm_log_sigma_moments():
    lam = EDM().logsnr(_grid_u())
    ln_sigma = -0.5 * lam
    assert abs(float(ln_sigma.mean()) + 1.2) < 1e-4
    assert abs(float(ln_sigma.std()) - 1.2) < 1e-3
    # on a VP path σ_EDM = σ/α
    p = VPCosine()
    t = EDM().t(_grid_u(1000), p)
    assert torch.allclose(torch.log(p.sigma(t) / p.alpha(t)), -0.5 * EDM().logsnr(_grid_u(1000)), atol=1e-9)


# ---- every density on every path ---------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp_cosine", "vp_linear", "rf"])
@pytest.mark.parametrize("name", sorted(DENSITIES))
def test_every_density_on_every_path(name, path_name):
    path, d = PATHS[path_name](), DENSITIES[name]()
    u = torch.cat([torch.tensor([0.0, 1.0 - 1e-16, 1.0], dtype=F64), _grid_u(4001)])
    t = d.t(u, path)
    assert torch.isfinite(t).all() and float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    g = _grid_u(4001)
    t = d.t(g, path)
    if isinstance(d, LogSNRDensity):  # the λ of those t is the density's λ, on any path
        lam = d.logsnr(g)
        ok = lam > -10.0  # vp_linear reaches only λ(1) ≈ −10.05
        assert torch.allclose(path.logsnr(t)[ok], lam[ok], atol=1e-6, rtol=1e-6)
    else:  # t-densities: the same t on every path; with on_path the λ of the reference path
        assert torch.allclose(t, d.sample_t(g))
        d_rf = DENSITIES[name](on_path="rf")
        lam = RectifiedFlow().logsnr(d.sample_t(g))
        ok = (lam > -10.0) & (lam.abs() < 29)
        assert torch.allclose(path.logsnr(d_rf.t(g, path))[ok], lam[ok], atol=1e-6, rtol=1e-6)
    # log_prob_logsnr is a normalised density of λ (checked against the sampled histogram mass)
    lam_s = path.logsnr(Diffusion(path, d).t_from_uniform(g))
    lo, hi = float(torch.quantile(lam_s, 0.2)), float(torch.quantile(lam_s, 0.8))
    grid = torch.linspace(lo, hi, 4001, dtype=F64)
    mass = float(torch.trapezoid(d.log_prob_logsnr(grid, path).exp(), grid))
    assert abs(mass - 0.6) < 2e-3, mass


def test_laplace_on_rectified_flow():
    d = Diffusion(RectifiedFlow(), Laplace(), "velocity")
    t = d.t_from_uniform(torch.tensor([0.5, 0.25], dtype=F64))
    # λ = 2 ln((1 − t)/t): λ = 0 at t = ½, λ = ln √2·... = 0.346574 ⇒ t = sigmoid(−0.173287)
    assert torch.allclose(t, torch.tensor([0.5, 1.0 / (1.0 + math.exp(0.173287))], dtype=F64), atol=1e-6)


# ---- importance weights ------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp_cosine", "vp_linear", "rf"])
def test_importance_weights_match_target_expectation(path_name):
    path = PATHS[path_name]()
    d = Diffusion(path, Uniform(importance="laplace", importance_args={"b": 0.5}))
    g = _grid_u()
    t = d.t_from_uniform(g)
    w = d.loss_weight(t)
    assert w.shape == t.shape and bool((w > 0).all())
    assert abs(float(w.mean()) - 1.0) < 1e-4
    lam = path.logsnr(t)
    # E_uniform[w·f(λ)] = E_laplace[f(λ)]: E λ² = 2b² = 0.5, P(|λ| > 3) = e^{-6}
    assert abs(float((w * lam**2).mean()) - 0.5) < 1e-3
    assert abs(float((w * (lam.abs() > 3)).mean()) - math.exp(-6)) < 1e-4
    # Monte Carlo with random draws: the weighted estimate matches the target density's mean of |λ|
    tr = d.t_from_uniform(_rand_u(50_000))
    est = float((d.loss_weight(tr) * path.logsnr(tr).abs()).mean())
    assert abs(est - 0.5) < 0.02  # E|λ| = b


def test_importance_between_lambda_densities_and_contract():
    path = RectifiedFlow()
    d = Cosine(importance="edm")
    t = Diffusion(path, d).t_from_uniform(_grid_u())
    w = d.weight(t, path)
    assert abs(float(w.mean()) - 1.0) < 2e-3
    # E_edm[λ] = 2.4
    assert abs(float((w * path.logsnr(t)).mean()) - 2.4) < 2e-2
    assert Laplace().weight(t, path) is None  # default: no weight
    with pytest.raises(ValueError):
        Uniform(importance="nope")
    with pytest.raises(ValueError):
        Uniform(importance_args={"b": 1.0})


def test_user_density_subclass():
    class Fixed(LogSNRDensity):
        def logsnr(self, u):
            return torch.full_like(u, 1.0)

    class Half(Density):
        def t(self, u, path):
            return torch.full_like(u, 0.5)

    d = Diffusion(VPCosine(), Fixed())
    t = d.t_from_uniform(_grid_u(8))
    assert torch.allclose(VPCosine().logsnr(t), torch.ones(8, dtype=F64)) and d.loss_weight(t) is None
    assert Diffusion(RectifiedFlow(), Half()).loss_weight(t) is None


# ---- weightings --------------------------------------------------------------------------------
def _t_at_snr(path, snr):
    return path.t_from_logsnr(torch.log(torch.as_tensor(snr, dtype=F64)))


def test_min_snr_per_target_on_vp():
    snr = torch.tensor([0.1, 1.0, 5.0, 20.0], dtype=F64)
    for path in (VPCosine(), VPLinear()):
        t = _t_at_snr(path, snr)
        m = torch.clamp(snr, max=5.0)
        w = MinSNR()
        assert torch.allclose(w.weight(t, path, "eps"), m / snr, rtol=1e-6)
        assert torch.allclose(w.weight(t, path, "v"), m / (snr + 1), rtol=1e-6)
        assert torch.allclose(w.weight(t, path, "x"), m, rtol=1e-6)
    # explicit values: SNR 20, γ = 5: eps 0.25, v 5/21, x 5
    t = _t_at_snr(VPCosine(), torch.tensor([20.0], dtype=F64))
    assert abs(float(MinSNR().weight(t, VPCosine(), "eps")) - 0.25) < 1e-9
    assert abs(float(MinSNR().weight(t, VPCosine(), "v")) - 5 / 21) < 1e-9


def test_min_snr_velocity_on_rf_is_x_equivalent():
    path = RectifiedFlow()
    snr = torch.tensor([0.1, 1.0, 5.0, 20.0], dtype=F64)
    t = _t_at_snr(path, snr)
    # velocity = ε − x0, det = 1, x0 error = t·(velocity error): weight min(SNR, γ)·t²
    assert torch.allclose(MinSNR().weight(t, path, "velocity"), torch.clamp(snr, max=5.0) * t**2, rtol=1e-9)
    # all targets then give the same weighted loss for the same x̂0 error
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 6, generator=g, dtype=F64)
    x0_hat = x0 + 0.1 * torch.randn(4, 6, generator=g, dtype=F64)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    eps_hat = (x_t - (1 - t)[:, None] * x0_hat) / t[:, None]
    losses = []
    for kind in TARGETS:
        err = target(kind, x0_hat, eps_hat, t, path) - target(kind, x0, eps, t, path)
        losses.append(MinSNR().weight(t, path, kind) * err.square().mean(1))
    for other in losses[1:]:
        assert torch.allclose(other, losses[0], rtol=1e-9)


def test_truncated_snr_and_sd3():
    path = VPCosine()
    snr = torch.tensor([0.25, 1.0, 4.0], dtype=F64)
    t = _t_at_snr(path, snr)
    assert torch.allclose(TruncatedSNR().weight(t, path, "x"), torch.tensor([1.0, 1.0, 4.0], dtype=F64))
    assert torch.allclose(TruncatedSNR().weight(t, path, "eps"), torch.tensor([4.0, 1.0, 1.0], dtype=F64))
    # SD3 lognorm on rf with uniform t reproduces logit-normal sampling in expectation
    rf = RectifiedFlow()
    tu = _grid_u()
    w = SD3("lognorm").weight(tu, rf, "velocity")
    assert abs(float(w.mean()) - 1.0) < 1e-3
    assert abs(float((w * (tu < 0.25)).mean()) - 0.1360) < 5e-4
    wc = SD3("cosmap").weight(tu, rf, "velocity")
    assert abs(float(wc.mean()) - 1.0) < 1e-3
    # CosMap on rf is the cosine λ-density: P(|λ| > 3) = 27.95 %
    assert abs(float((wc * (rf.logsnr(tu).abs() > 3)).mean()) - 0.2795) < 1e-3
    with pytest.raises(ValueError):
        SD3("mode")


# ---- Diffusion wiring, config and defaults ------------------------------------------------------
def test_defaults_unchanged_bitwise():
    import difftrain.diffusion.densities as D

    g = torch.Generator().manual_seed(3)
    u = torch.rand(64, generator=g, dtype=F64)
    x0, eps = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    pred = torch.randn(64, 3, 4, 4, generator=g)
    for cfg in (DiffusionConfig(), DiffusionConfig(path="rf", density="logit_normal", target="velocity"),
                DiffusionConfig(density="logit_normal", density_args={"mean": 0.3, "std": 0.7})):
        d = build_diffusion(cfg)
        t = d.t_from_uniform(u)
        if cfg.density == "uniform":
            ref = (0.0 + (1.0 - 0.0) * u).clamp(d.t_min, d.t_max)
        else:
            m, s = d.density.mean, d.density.std
            ref = torch.sigmoid(m + s * (math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0))).clamp(d.t_min, d.t_max)
        assert torch.equal(t, ref)
        t = t.float()
        assert d.loss_weight(t) is None
        err = pred - d.target(x0, eps, t)
        assert torch.equal(d.loss(pred, x0, eps, t), err.square().flatten(1).mean(dim=1))
        w = torch.rand(64, generator=g)
        assert torch.equal(d.loss(pred, x0, eps, t, w), err.square().flatten(1).mean(dim=1) * w)
    assert D.LogitNormal().shift == 1.0


def test_diffusion_loss_combines_weights():
    d = Diffusion(VPCosine(), Uniform(importance="laplace"), "eps", weighting=MinSNR(gamma=2.0))
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    x0, eps = torch.zeros(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64)
    pred = torch.zeros(3, 2, dtype=F64)  # error 1 everywhere
    lw = d.density.weight(t, d.path) * MinSNR(2.0).weight(t, d.path, "eps")
    assert torch.allclose(d.loss_weight(t), lw)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert torch.allclose(d.loss(pred, x0, eps, t, w), lw * w)


def test_config_and_build():
    cfg = load_config(None, ["diffusion.density=laplace", "diffusion.density_args.b=0.25",
                             "diffusion.path=rf", "diffusion.target=velocity",
                             "diffusion.weighting=min_snr", "diffusion.weighting_args.gamma=3"])
    d = build_diffusion(cfg.diffusion)
    assert isinstance(d.density, Laplace) and d.density.b == 0.25
    assert isinstance(d.weighting, MinSNR) and d.weighting.gamma == 3.0
    for name in DENSITIES:
        build_diffusion(DiffusionConfig(density=name))
    for name in WEIGHTINGS:
        build_diffusion(DiffusionConfig(weighting=name))
    d = build_diffusion(DiffusionConfig(density="uniform", density_args={"importance": "laplace"}))
    assert d.loss_weight(torch.tensor([0.5])) is not None
    with pytest.raises(ConfigError, match="'diffusion.weighting'"):
        build_diffusion(DiffusionConfig(weighting="p2"))
    with pytest.raises(ConfigError, match="'diffusion.weighting_args'"):
        build_diffusion(DiffusionConfig(weighting="min_snr", weighting_args={"gama": 5}))
    with pytest.raises(ConfigError, match="'diffusion.density_args'"):
        build_diffusion(DiffusionConfig(density="laplace", density_args={"b": -1}))
    with pytest.raises(ConfigError, match="'diffusion.density_args'"):
        build_diffusion(DiffusionConfig(density="uniform", density_args={"importance": "nope"}))
    with pytest.raises(ConfigError, match="weighting"):
        load_config(None, ["diffusion.weighting=p2"])
