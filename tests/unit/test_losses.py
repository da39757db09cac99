"""Regression distances of ``Diffusion.loss``: l2 and the pseudo-Huber of iCT / RF++ (REFERENCES C)."""
import math

import pytest
import torch

from difftrain.diffusion.densities import Uniform
from difftrain.diffusion.diffusion import DISTANCES, Diffusion, pseudo_huber, squared_error
from difftrain.diffusion.paths import RectifiedFlow
from difftrain.diffusion.weightings import MinSNR

F64 = torch.float64


def test_pseudo_huber_value_and_default_c():
    pred = torch.zeros(2, 3, 4, 4, dtype=F64)
    target = torch.zeros(2, 3, 4, 4, dtype=F64)
    target[0, 0, 0, 0], target[0, 1, 2, 3] = 3.0, 4.0  # ‖r‖ = 5 for sample 0, 0 for sample 1
    c = 0.00054 * math.sqrt(48)  # d = 3*4*4 = 48: sqrt(d), not d (RF++'s released code)
    out = pseudo_huber(pred, target)
    assert out.shape == (2,)
    assert float(out[0]) == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-14)
    assert float(out[1]) == 0.0
    assert float(pseudo_huber(pred, target, c=1.0)[0]) == pytest.approx(math.sqrt(26) - 1, rel=1e-14)
    with pytest.raises(ValueError, match="c > 0"):
        pseudo_huber(pred, target, c=0.0)


def test_pseudo_huber_limits():
    """‖r‖²/(2c) for residuals far below c, ‖r‖ (L1 in the norm) far above it; float32 keeps the small regime."""
    c = 0.00054 * math.sqrt(64)
    r = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    norm = r.double().norm(dim=1)
    for scale in (1e-4, 1e-6):  # ‖r‖ ≈ 8·scale ≪ c ≈ 4.3e-3; relative gap ≈ ‖r‖²/(4c²)
        small = r * scale
        expected = (norm * scale) ** 2 / (2 * c)
        got = pseudo_huber(small, torch.zeros_like(small)).double()
        assert torch.allclose(got, expected, rtol=0.02 if scale == 1e-4 else 1e-4), (scale, got / expected)
    big = r * 100.0
    got = pseudo_huber(big, torch.zeros_like(big)).double()
    assert torch.allclose(got, norm * 100.0, rtol=1e-5)
    assert torch.allclose(got, norm * 100.0 - c, rtol=1e-6)


def test_pseudo_huber_in_low_precision_and_gradient():
    pred = torch.randn(4, 2, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(4, 2, 8, 8)
    out = pseudo_huber(pred, target)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(pred.grad.float()).all()
    zero = torch.zeros(2, 5, requires_grad=True)
    pseudo_huber(zero, torch.zeros(2, 5)).sum().backward()  # at r = 0: gradient 0, not NaN
    assert torch.equal(zero.grad, torch.zeros(2, 5))


def test_diffusion_loss_distance_choice():
    d = Diffusion(RectifiedFlow(), Uniform(), "velocity", weighting=MinSNR(gamma=2.0))
    g = torch.Generator().manual_seed(1)
    x0, eps, pred = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.8])
    target = d.target(x0, eps, t)
    lw = d.loss_weight(t)
    assert torch.equal(d.loss(pred, x0, eps, t), squared_error(pred, target) * lw)
    assert torch.equal(d.loss(pred, x0, eps, t, distance="pseudo_huber"), pseudo_huber(pred, target) * lw)
    assert set(DISTANCES) == {"l2", "pseudo_huber"}
    with pytest.raises(ValueError, match="unknown loss distance 'l1'; valid: l2, pseudo_huber"):
        d.loss(pred, x0, eps, t, distance="l1")
