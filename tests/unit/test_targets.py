"""Prediction targets, the Diffusion bundle and classifier-free guidance."""
import pytest
import torch

from difftrain.config import ConfigError, DiffusionConfig
from difftrain.diffusion.densities import LogitNormal, Uniform
from difftrain.diffusion.diffusion import Diffusion, build_diffusion
from difftrain.diffusion.guidance import cfg_combine, guided_denoiser
from difftrain.diffusion.paths import PATHS, RectifiedFlow, VPCosine
from difftrain.diffusion.targets import TARGETS, target, to_x0, to_x0_eps

F64 = torch.float64


def _batch(b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(b, 3, 4, 4, generator=g, dtype=F64)
    t = torch.rand(b, generator=g, dtype=F64) * 0.98 + 0.01
    return x0, eps, t


LINEAR = [k for k in TARGETS if k != "x_eps"]  # x_eps predicts 2C channels: its own tests below


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("kind", LINEAR)
def test_conversions_are_exact(path_name, kind):
    path = PATHS[path_name]()
    x0, eps, t = _batch()
    a, s = path.alpha(t).view(-1, 1, 1, 1), path.sigma(t).view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    pred = target(kind, x0, eps, t, path)
    x0_hat, eps_hat = to_x0_eps(kind, pred, x_t, t, path)
    assert (x0_hat - x0).abs().max() <= 1e-10
    assert (eps_hat - eps).abs().max() <= 1e-10
    assert (to_x0(kind, pred, x_t, t, path) - x0).abs().max() <= 1e-10
    # the other direction: a prediction built from (x̂0, ε̂) is reproduced exactly
    pred2 = target(kind, x0_hat, eps_hat, t, path)
    assert (pred2 - pred).abs().max() <= 1e-10


def test_target_oracles():
    x0, eps, t = _batch(8)
    rf, cos = RectifiedFlow(), VPCosine()
    assert torch.allclose(target("velocity", x0, eps, t, rf), eps - x0, atol=1e-14)
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(target("v", x0, eps, t, rf), (1 - tt) * eps - tt * x0, atol=1e-14)
    # on VP-cosine the velocity is (π/2)·v: v is dx/dφ with φ = πt/2
    assert torch.allclose(target("velocity", x0, eps, t, cos), torch.pi / 2 * target("v", x0, eps, t, cos), atol=1e-12)
    assert target("eps", x0, eps, t, rf) is eps and target("x", x0, eps, t, rf) is x0
    with pytest.raises(ValueError, match="valid"):
        target("score", x0, eps, t, rf)


@pytest.mark.parametrize("kind", LINEAR)
def test_conversions_finite_at_singular_points(kind):
    path = VPCosine()
    t = torch.tensor([0.0, 1.0])
    x = torch.randn(2, 5)
    x0, eps = to_x0_eps(kind, torch.randn(2, 5), x, t, path)
    assert not torch.isnan(x0).any() and not torch.isnan(eps).any()


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_x_eps_merges_both_predictions(path_name):
    """Salimans & Ho 2022 sec. 4: x^ = (sigma^2 x~ + alpha (x_t - sigma eps~)) / (alpha^2 + sigma^2): exact for exact
    predictions, x~ at pure noise, x_t / alpha at sigma = 0, and the loss is zero for exact predictions."""
    from difftrain.diffusion.targets import merge_x_eps

    path = PATHS[path_name]()
    x0, eps, t = _batch()
    a, s = path.alpha(t).view(-1, 1, 1, 1), path.sigma(t).view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    both = torch.cat([x0, eps], 1)
    assert (to_x0("x_eps", both, x_t, t, path) - x0).abs().max() <= 1e-10
    x0_hat, eps_hat = to_x0_eps("x_eps", both, x_t, t, path)
    assert (x0_hat - x0).abs().max() <= 1e-10 and (eps_hat - eps).abs().max() <= 1e-9
    # a wrong x~ or eps~ moves x^ by its share: sigma^2 / (alpha^2 + sigma^2) and alpha sigma / (alpha^2 + sigma^2)
    d = torch.ones_like(x0)
    k = (a.square() + s.square())
    assert torch.allclose(merge_x_eps(torch.cat([x0 + d, eps], 1), x_t, t, path) - x0, s.square() / k * d)
    assert torch.allclose(merge_x_eps(torch.cat([x0, eps + d], 1), x_t, t, path) - x0, -a * s / k * d)
    ends = torch.tensor([1.0, 0.0], dtype=F64)  # pure noise (alpha = 0 on VP-cosine and RF) and data (sigma = 0)
    xt = torch.randn(2, 3, 4, 4, dtype=F64)
    out = merge_x_eps(torch.cat([x0[:2], eps[:2]], 1), xt, ends, path)
    if path.alpha(ends)[0] == 0:
        assert torch.equal(out[0], x0[0])
    assert torch.allclose(out[1], xt[1] / path.alpha(ends)[1])
    diff = Diffusion(path, Uniform(), "x_eps")
    assert diff.loss(both.float(), x0.float(), eps.float(), t.float()).abs().max() < 1e-5
    with pytest.raises(ValueError, match="needs a model with twice the data's channels"):
        to_x0("x_eps", x0, x_t, t, path)


# ---- Diffusion -------------------------------------------------------------------------------
def test_diffusion_bundle():
    d = Diffusion(RectifiedFlow(), LogitNormal(), "velocity", t_min=0.01, t_max=0.99)
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-12], dtype=F64)
    assert d.t_from_uniform(u).tolist() == pytest.approx([0.01, 0.5, 0.99])
    x0, eps, t = _batch(4)
    x_t = d.add_noise(x0, eps, t)
    assert torch.allclose(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    pred = d.target(x0, eps, t)
    assert torch.allclose(d.x0_from_pred(pred, x_t, t), x0, atol=1e-12)
    loss = d.loss(pred, x0, eps, t)
    assert loss.shape == (4,) and float(loss.abs().max()) == 0.0
    noisy = pred + torch.arange(4, dtype=F64).view(-1, 1, 1, 1)
    assert torch.allclose(d.loss(noisy, x0, eps, t), torch.arange(4, dtype=F64) ** 2)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=F64)
    assert torch.allclose(d.loss(noisy, x0, eps, t, w), w * torch.arange(4, dtype=F64) ** 2)
    assert d.loss(pred.to(torch.bfloat16), x0.float(), eps.float(), t.float()).dtype == torch.float32
    den = d.denoiser(lambda x, tt, c: d.target(x0, eps, tt))
    assert torch.allclose(den(x_t, t), x0, atol=1e-12)


def test_build_diffusion():
    d = build_diffusion(DiffusionConfig())
    assert isinstance(d.path, VPCosine) and isinstance(d.density, Uniform) and d.target_kind == "v"
    cfg = DiffusionConfig(path="rf", density="logit_normal", density_args={"std": 0.5}, target="velocity")
    d = build_diffusion(cfg)
    assert isinstance(d.path, RectifiedFlow) and d.density.std == 0.5
    with pytest.raises(ConfigError, match="density_args"):
        build_diffusion(DiffusionConfig(density="logit_normal", density_args={"scale": 2.0}))
    with pytest.raises(ConfigError, match="diffusion"):
        build_diffusion(DiffusionConfig(t_min=0.5, t_max=0.1))


# ---- classifier-free guidance ----------------------------------------------------------------
def test_cfg_combine_ends_are_exact():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(cfg_combine(c, u, 1.0), c)
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    assert torch.allclose(cfg_combine(c, u, 3.0), u + 3.0 * (c - u), atol=1e-6)
    w = torch.tensor([1.0, 0.0, 2.5])
    out = cfg_combine(c, u, w)
    assert torch.equal(out[0], c[0]) and torch.equal(out[1], u[1])
    assert torch.allclose(out[2], u[2] + 2.5 * (c[2] - u[2]), atol=1e-6)


def test_guided_denoiser_batches_cond_and_uncond():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * t.view(-1, 1) + cond["y"].view(-1, 1).to(x.dtype)

    x, t = torch.randn(3, 5), torch.rand(3)
    cond, uncond = {"y": torch.tensor([1, 2, 3])}, {"y": torch.tensor([0])}
    null = {"y": torch.zeros(3, dtype=torch.long)}
    c_out, u_out = model(x, t, cond), model(x, t, null)
    calls.clear()
    assert torch.equal(guided_denoiser(model, cond, uncond, 1.0)(x, t), c_out)
    assert torch.equal(guided_denoiser(model, cond, uncond, 0.0)(x, t), u_out)
    assert calls == [3, 6]
    out = guided_denoiser(model, cond, uncond, 4.0)(x, t)
    assert torch.allclose(out, u_out + 4.0 * (c_out - u_out), atol=1e-5)
    # combining in prediction space then converting equals converting each branch
    d = Diffusion(VPCosine(), Uniform(), "eps")
    tt = torch.full((3,), 0.5)
    g = guided_denoiser(model, cond, uncond, 4.0, to_x0=d.x0_from_pred)(x, tt)
    xc, xu = d.x0_from_pred(model(x, tt, cond), x, tt), d.x0_from_pred(model(x, tt, null), x, tt)
    assert torch.allclose(g, xu + 4.0 * (xc - xu), atol=1e-4)
