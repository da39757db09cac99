"""Straightness of a sampling ODE: how far its velocity strays from the straight line it ends up taking.

Liu et al. 2022 ("Flow Straight and Fast", sec. 2.2, the straightness S(Z) of a flow): for a trajectory x_t
from the noise x_T (t = t_0) to the sample x_end (t = t_n),

    S = ∫ ‖v(x_t, t) − (x_end − x_T) / (t_n − t_0)‖² dt / |t_n − t_0|,

zero exactly when every trajectory is a straight line travelled at constant speed (then one Euler step is
exact). Here v is the PF-ODE velocity of the model (``samplers._Grid.velocity``: α'·x̂0 + σ'·ε̂, on any path),
the trajectory is the Euler one on ``ts`` and the integral the left Riemann sum on the same grid; ‖·‖² is the
mean over elements. Reflow should drive it down (REFERENCES.md section C).
"""
from __future__ import annotations

import torch

from difftrain.diffusion.samplers import _Grid
from difftrain.train.supervise import point


@torch.no_grad()
def straightness(denoise_fn, x_T: torch.Tensor, ts: torch.Tensor, *, path) -> torch.Tensor:
    """Per-sample straightness [B] of the Euler trajectory of ``denoise_fn(x, t) -> x̂0`` on the grid ``ts``."""
    g, x = _Grid(ts, path, x_T), x_T
    velocities, steps = [], []
    for i in range(g.n):
        point()
        x0 = denoise_fn(x, g.t_batch(i))
        v = g.velocity(x, x0, i)
        velocities.append(v)
        steps.append(g.t[i + 1] - g.t[i])
        x = g.ddim(x, x0, i, i + 1) if i == g.n - 1 and g.ends_at_data else x + steps[-1] * v
    span = g.t[-1] - g.t[0]
    line = (x - x_T) / span
    dev = sum(h.abs() * (v - line).square().flatten(1).mean(1) for v, h in zip(velocities, steps))
    return dev / span.abs()


@torch.no_grad()
def model_straightness(model, diffusion, conditioner, *, n: int, shape: tuple[int, ...], steps: int,
                       guidance: float, seed: int, device, captions=None, labels=None, start: int = 0) -> torch.Tensor:
    """Straightness [n] of the (guided) sampling ODE of ``model`` from the noise of samples ``start .. start+n-1``
    (keyed as in ``sampling.generate``, so these are the trajectories the samples take)."""
    from difftrain.diffusion.keyed import keyed_randn
    from difftrain.diffusion.samplers import time_grid
    from difftrain.sampling import guided_x0

    fn = guided_x0(model, diffusion, conditioner, conditioner(captions, labels), guidance, n, device)
    x_T = keyed_randn(seed, 0, range(start, start + n), shape, "sample").to(device)
    return straightness(lambda x, t: fn(x, t).float(), x_T, time_grid(steps, 1.0, 0.0).to(device), path=diffusion.path)
