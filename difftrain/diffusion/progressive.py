"""The math of progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2 and sec. 3), on our paths (t in [0, 1], t = 0 data, x_t = alpha(t) x + sigma(t) eps).

A student of N DDIM steps trains and samples on ``student_grid(N)`` = ``time_grid(N, 1, 0)``; its teacher takes 2N
steps on ``time_grid(2N, 1, 0)``, which contains the student's grid exactly (``time_grid`` is uniform in t and
``linspace`` gives bitwise the same points: tested for N up to 1024). For a student step t -> t_end the teacher
takes the two steps t -> t_mid -> t_end (``round_steps``) and lands on z''; the student's x target x~ is the one
for which ONE DDIM step t -> t_end lands on z'' too (``progressive_target``):

    x~ = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t)

``ddim_step`` applies the one DDIM formula of the package, ``samplers.ddim_update`` (the samplers use it too).
"""
from __future__ import annotations

import math

import torch

from difftrain.diffusion.paths import Path
from difftrain.diffusion.samplers import ddim_update, time_grid


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients [B] (or a scalar) in ``like``'s dtype/device, shaped to broadcast against [B, ...]."""
    c = c.to(device=like.device, dtype=like.dtype)
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


def _times(t, like: torch.Tensor) -> torch.Tensor:
    """t as a float64 tensor on ``like``'s device (a float, a 0-d tensor or [B])."""
    return torch.as_tensor(t, dtype=torch.float64, device=like.device)


def ddim_step(x0_hat: torch.Tensor, x_t: torch.Tensor, t, s, path: Path) -> torch.Tensor:
    """One DDIM step of ``x_t`` from time ``t`` to ``s`` given the data prediction ``x0_hat`` (``ddim_update``).

    ``t``, ``s``: floats, 0-d tensors or per-sample [B]; x's are [B, ...]. The coefficients are computed in float64
    and cast to x's dtype. Valid on every ``Path``.
    """
    t64, s64 = _times(t, x_t), _times(s, x_t)
    return ddim_update(x0_hat, x_t, _bcast(path.alpha(t64), x_t), _bcast(path.sigma(t64), x_t),
                       _bcast(path.alpha(s64), x_t), _bcast(path.sigma(s64), x_t))


@torch.no_grad()
def teacher_two_steps(x0_fn, x_t: torch.Tensor, t, t_mid, t_end, path: Path) -> torch.Tensor:
    """z'': the teacher's two DDIM steps t -> t_mid -> t_end from ``x_t`` (Salimans & Ho 2022, Algorithm 2).

    ``x0_fn(x, t_batch) -> x0^`` is the teacher's (possibly guided) data prediction; it is called with per-sample
    times [B] (float64: cast inside x0_fn if the model wants another dtype). No gradient flows.
    """
    b = x_t.shape[0]
    t, t_mid = _times(t, x_t).expand(b), _times(t_mid, x_t).expand(b)
    z_mid = ddim_step(x0_fn(x_t, t), x_t, t, t_mid, path)
    return ddim_step(x0_fn(z_mid, t_mid), z_mid, t_mid, t_end, path)


def progressive_target(x_t: torch.Tensor, t, z_end: torch.Tensor, t_end, path: Path) -> torch.Tensor:
    """x~: the student's x target, the x0 prediction for which one DDIM step t -> t_end from ``x_t`` gives ``z_end``
    (Salimans & Ho 2022, Algorithm 2, "x~ = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t)").

    Derivation: one DDIM step gives alpha'' x~ + sigma'' (z_t - alpha_t x~)/sigma_t; set it equal to z'' and solve.
    At t_end = 0 (sigma'' = 0) the ratio is exactly 0 and x~ = z''/alpha'' exactly (= z'' on VP-cosine and RF). Needs
    sigma_t > 0 and lambda(t_end) > lambda(t) (t_end < t). ``t``, ``t_end``: floats, 0-d or [B]; x's [B, ...].
    Computed in x_t's dtype (use float64: the denominator is a difference of nearby numbers for short steps).
    """
    a_t, s_t = _bcast(path.alpha(_times(t, x_t)), x_t), _bcast(path.sigma(_times(t, x_t)), x_t)
    a_e, s_e = _bcast(path.alpha(_times(t_end, x_t)), x_t), _bcast(path.sigma(_times(t_end, x_t)), x_t)
    ratio = s_e / s_t
    return (z_end - ratio * x_t) / (a_e - ratio * a_t)


# ------------------------------------------------------------------------------------------------ grids
def student_grid(n_steps: int) -> torch.Tensor:
    """The N + 1 float64 times a student of ``n_steps`` DDIM steps trains on AND samples with: time_grid(N, 1, 0)."""
    return time_grid(n_steps, 1.0, 0.0)


def round_steps(n_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t_mid, t_end), each [N] float64: student step i goes t[i] -> t_end[i] on ``student_grid(N)``, and the
    teacher's 2N-step grid ``time_grid(2N, 1, 0)`` visits t[i] -> t_mid[i] -> t_end[i] (its points 2i, 2i+1, 2i+2)."""
    student, teacher = student_grid(n_steps), time_grid(2 * n_steps, 1.0, 0.0)
    if not torch.equal(teacher[::2], student):  # time_grid is uniform in t: nested exactly (tested)
        raise AssertionError(f"time_grid({2 * n_steps}) does not contain time_grid({n_steps})")
    return student[:-1], teacher[1::2], student[1:]


# ------------------------------------------------------------------------------------------------ schedules
def cosine_logsnr(u: torch.Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> torch.Tensor:
    """Salimans & Ho 2022's clipped cosine log-SNR on u in [0, 1] (u = 1 noise; their code's ``logsnr_schedule_cosine``):

        lambda(u) = -2 ln tan(a u + b),  b = atan(exp(-lambda_max/2)),  a = atan(exp(-lambda_min/2)) - b

    so lambda(0) = lambda_max and lambda(1) = lambda_min. Our ``paths.VPCosine`` is the unclipped schedule
    (a = pi/2, b = 0: lambda(t) = -2 ln tan(pi t/2)), guarded only by the +-30 clamp of ``paths.LOGSNR_MAX`` and the
    training clamp [diffusion.t_min, t_max] = [1e-4, 1 - 1e-4] (|lambda| <= 17.5). The clipped schedule is the same
    curve on a shorter range: lambda_clipped(u) = VPCosine.logsnr(t) at t = (2/pi)(a u + b), i.e. t in
    [2b/pi, 1 - 2b/pi] = [2.9e-5, 1 - 2.9e-5] for +-20.
    """
    u = torch.as_tensor(u)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    lam = -2.0 * torch.log(torch.tan(a * u.to(torch.float64) + b))  # float64: tan is steep near pi/2
    return lam.to(u.dtype) if u.is_floating_point() else lam
