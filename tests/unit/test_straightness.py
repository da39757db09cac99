"""Straightness (Liu et al. 2022) on flows whose shape is known."""
import torch

from difftrain.diffusion.paths import RectifiedFlow, VPCosine
from difftrain.diffusion.samplers import time_grid
from difftrain.eval.straightness import straightness


def test_a_single_data_point_on_rectified_flow_is_straight():
    g = torch.Generator().manual_seed(0)
    target, z = torch.randn(1, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    s = straightness(lambda x, t: target.expand_as(x), z, time_grid(8, 1.0, 0.0), path=RectifiedFlow())
    assert s.shape == (5,) and s.abs().max() < 1e-10


def test_curved_flows_are_not_straight():
    g = torch.Generator().manual_seed(0)
    target, z = torch.randn(1, 8, generator=g), torch.randn(64, 8, generator=g)
    # VP-cosine with the same fixed x0: x_t = α x* + σ z bends (α² + σ² = 1), exactly followed by DDIM
    vp = straightness(lambda x, t: target.expand_as(x), z.double(), time_grid(64, 1.0, 1e-3), path=VPCosine())
    assert vp.min() > 0.05
    # rectified flow with the posterior mean of a two-point data set {-1, +1}: trajectories bend toward a mode
    def two_points(x, t):
        tt = t.view(-1, 1)
        w = torch.tanh((1 - tt) * x / tt ** 2)  # E[x0 | x_t] for x0 = ±1 equally likely, x_t = (1-t) x0 + t ε
        return w
    rf = straightness(two_points, z, time_grid(64, 1.0, 0.0), path=RectifiedFlow())
    assert rf.mean() > 0.05
    coarse = straightness(two_points, z, time_grid(4, 1.0, 0.0), path=RectifiedFlow())
    assert torch.isfinite(coarse).all()
