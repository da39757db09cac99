"""Progressive distillation math against exact oracles (REFERENCES E; Salimans & Ho 2022, Algorithm 2).

Gaussian data x0 ~ N(mu, diag(S^2)): x_t ~ N(alpha mu, alpha^2 S^2 + sigma^2), the ideal denoiser is
E[x0 | x_t] = mu + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha mu), and the probability-flow ODE map is linear:
x_s = alpha_s mu + sqrt(v_s / v_t) (x_t - alpha_t mu), v = alpha^2 S^2 + sigma^2 (as in test_samplers.py, with a mean).
"""
import math

import pytest
import torch

from difftrain.diffusion.paths import PATHS, VPCosine
from difftrain.diffusion.progressive import (cosine_logsnr, ddim_step, progressive_target, round_steps,
                                             student_grid, teacher_two_steps)
from difftrain.diffusion.samplers import ddim, ddim_update, time_grid

F64 = torch.float64
MU = torch.linspace(-1.0, 2.0, 8, dtype=F64)
S = torch.linspace(0.3, 1.2, 8, dtype=F64)
PATH_NAMES = ["vp_cosine", "vp_linear", "rf"]


def _col(c, x):
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _var(path, t):
    return path.alpha(t)[:, None] ** 2 * S**2 + path.sigma(t)[:, None] ** 2  # [B, 8]


def ideal_denoiser(path):
    def x0_fn(x, t):
        assert t.shape == (x.shape[0],)
        a = path.alpha(t)[:, None]
        return MU + a * S**2 / _var(path, t) * (x - a * MU)

    return x0_fn


def ode_map(path, x, t, s):
    """Exact PF-ODE solution from time t to s (per sample [B])."""
    return path.alpha(s)[:, None] * MU + (_var(path, s) / _var(path, t)).sqrt() * (x - path.alpha(t)[:, None] * MU)


def _random_steps(n, gen, with_zero=True):
    """Per-sample (t, t_mid, t_end) with 1 >= t > t_mid > t_end >= 0; half the samples end at t_end = 0."""
    u = torch.rand(n, 3, generator=gen, dtype=F64).sort(dim=1, descending=True).values
    t, mid, end = u[:, 0] * 0.98 + 0.02, u[:, 1] * 0.98 + 0.01, u[:, 2] * 0.98
    if with_zero:
        end[: n // 2] = 0.0
    return t, mid, end


# ------------------------------------------------------------------------------------------------ (a) perfect teacher
@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_perfect_teacher_target_is_the_data(path_name):
    """A delta data distribution: the teacher's x0 prediction is x itself, and x~ = x to float64 round-off."""
    path, gen = PATHS[path_name](), torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 4, generator=gen, dtype=F64)
    eps = torch.randn(16, 3, 4, 4, generator=gen, dtype=F64)
    t, mid, end = _random_steps(16, gen)
    x_t = _col(path.alpha(t), x) * x + _col(path.sigma(t), x) * eps
    seen = []

    def x0_fn(y, tt):
        seen.append(tt)
        return x.clone()

    z_end = teacher_two_steps(x0_fn, x_t, t, mid, end, path)
    assert [tt.tolist() for tt in seen] == [t.tolist(), mid.tolist()]
    x_tilde = progressive_target(x_t, t, z_end, end, path)
    assert torch.allclose(x_tilde, x, rtol=0, atol=1e-12), (x_tilde - x).abs().max()


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_target_to_data_end_is_exact(path_name):
    """t_end = 0 (sigma'' = 0): x~ = z''/alpha'' bitwise, finite, whatever x_t."""
    path, gen = PATHS[path_name](), torch.Generator().manual_seed(1)
    x_t, z = torch.randn(4, 8, generator=gen, dtype=F64), torch.randn(4, 8, generator=gen, dtype=F64)
    t, zero = torch.tensor([1.0, 0.7, 0.3, 1e-3], dtype=F64), torch.zeros(4, dtype=F64)
    x_tilde = progressive_target(x_t, t, z, zero, path)
    assert torch.equal(x_tilde, z / path.alpha(zero)[:, None])
    assert torch.equal(ddim_step(x_tilde, x_t, t, zero, path), path.alpha(zero)[:, None] * x_tilde)


# ------------------------------------------------------------------------------------------------ DDIM
def test_ddim_step_is_euler_on_rectified_flow():
    path, gen = PATHS["rf"](), torch.Generator().manual_seed(2)
    x, x0 = torch.randn(5, 8, generator=gen, dtype=F64), torch.randn(5, 8, generator=gen, dtype=F64)
    t, s = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.05], dtype=F64), torch.tensor([0.8, 0.3, 0.25, 0.1, 0.0], dtype=F64)
    eps_hat = (x - (1 - t)[:, None] * x0) / t[:, None]
    euler = x + (s - t)[:, None] * (eps_hat - x0)  # velocity eps^ - x0^ (Liu et al. 2022)
    assert torch.allclose(ddim_step(x0, x, t, s, path), euler, rtol=0, atol=1e-14)


def test_ddim_update_to_data_has_no_nan():
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    x0 = torch.tensor([1.5, -2.0])
    assert torch.equal(ddim_update(x0, x0, one, zero, one, zero), x0)  # sigma_t = sigma_s = 0: eps^ is 0/0


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_ddim_step_matches_the_sampler(path_name):
    """The sampler's DDIM and ddim_step are one formula: n steps of ddim_step == samplers.ddim, bitwise."""
    path, gen = PATHS[path_name](), torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float32)
    ts, den = time_grid(6), (lambda y, t: torch.tanh(y * 0.8 + t[:, None]))
    y = x
    for i in range(6):
        t = ts[i].to(torch.float32).expand(3)
        y = ddim_step(den(y, t), y, ts[i], ts[i + 1], path)
    assert torch.equal(y, ddim(den, x, ts, path=path))


# ------------------------------------------------------------------------------------------------ (b) Gaussian data
@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_student_step_reproduces_the_teacher_two_steps(path_name):
    path, gen = PATHS[path_name](), torch.Generator().manual_seed(4)
    t, mid, end = _random_steps(32, gen)
    x_t = torch.randn(32, 8, generator=gen, dtype=F64) * _var(path, t).sqrt() + path.alpha(t)[:, None] * MU
    z_end = teacher_two_steps(ideal_denoiser(path), x_t, t, mid, end, path)
    x_tilde = progressive_target(x_t, t, z_end, end, path)
    assert torch.allclose(ddim_step(x_tilde, x_t, t, end, path), z_end, rtol=0, atol=1e-12)
    # a real (non-trivial) target: not the teacher's first x0 prediction
    assert (x_tilde - ideal_denoiser(path)(x_t, t)).abs().max() > 1e-3


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_ddim_with_the_ideal_denoiser_converges_to_the_ode(path_name):
    path, gen = PATHS[path_name](), torch.Generator().manual_seed(5)
    x1 = torch.randn(6, 8, generator=gen, dtype=F64)
    one, zero = torch.ones(6, dtype=F64), torch.zeros(6, dtype=F64)
    exact = ode_map(path, x1, one, zero)
    errs = [float((ddim(ideal_denoiser(path), x1, time_grid(n), path=path) - exact).abs().max()) for n in (64, 128, 256)]
    assert errs[2] < 0.02, errs
    assert 1.6 < errs[0] / errs[1] < 2.5 and 1.6 < errs[1] / errs[2] < 2.5, errs  # first order


def exact_fit_student(teacher_x0, n_steps, path):
    """The student of ``n_steps`` that fits its progressive target exactly: at a grid time t_i its x0 prediction is
    x~(x, t_i) computed from the teacher's two DDIM steps t_i -> t_mid -> t_{i+1} (the teacher has 2N steps)."""
    t_all, mid_all, end_all = round_steps(n_steps)

    def x0_fn(x, t):
        i = torch.round((1.0 - t.double()) * n_steps).long()
        assert torch.equal(t_all[i], t.double()), "a student is only asked at its own grid points"
        z_end = teacher_two_steps(teacher_x0, x, t_all[i], mid_all[i], end_all[i], path)
        return progressive_target(x, t_all[i], z_end, end_all[i], path)

    return x0_fn


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_rounds_of_exact_students_keep_the_teachers_endpoint(path_name):
    """Rounds 64 -> 32 -> ... -> 1 steps, each student an exact fit to its teacher's two steps: every student's DDIM
    sampling on its own grid lands where the original 128-step teacher lands, and that is close to the exact ODE."""
    path, gen = PATHS[path_name](), torch.Generator().manual_seed(6)
    x1 = torch.randn(4, 8, generator=gen, dtype=F64)
    teacher, n = ideal_denoiser(path), 128
    reference = ddim(teacher, x1, student_grid(n), path=path)
    exact = ode_map(path, x1, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64))
    assert (reference - exact).abs().max() < 0.05
    while n > 1:
        n //= 2
        teacher = exact_fit_student(teacher, n, path)
        out = ddim(teacher, x1, student_grid(n), path=path)  # the student samples on its training grid
        assert torch.allclose(out, reference, rtol=0, atol=1e-10), (n, (out - reference).abs().max())


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64, 1024])
def test_student_grid_is_nested_in_the_teachers(n):
    assert torch.equal(student_grid(n), time_grid(n, 1.0, 0.0))
    t, mid, end = round_steps(n)
    teacher = time_grid(2 * n, 1.0, 0.0)
    assert torch.equal(t, teacher[0:-1:2]) and torch.equal(mid, teacher[1::2]) and torch.equal(end, teacher[2::2])
    assert bool((t > mid).all() and (mid > end).all()) and t[0] == 1.0 and end[-1] == 0.0


# ------------------------------------------------------------------------------------------------ (c) schedules
def test_cosine_logsnr_values():
    lam = cosine_logsnr(torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64))
    assert torch.allclose(lam, torch.tensor([20.0, 1.7626, 0.0, -20.0], dtype=F64), rtol=0, atol=1e-4), lam
    assert abs(float(lam[1]) - 1.7626187665611515) < 1e-12
    assert cosine_logsnr(torch.tensor([0.3])).dtype == torch.float32


def test_clipped_cosine_is_our_vp_cosine_on_a_shorter_range():
    """lambda_clipped(u) = VPCosine.logsnr((2/pi)(a u + b)); and sigma from lambda is sin(pi t/2) there."""
    u = torch.linspace(0, 1, 11, dtype=F64)
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    t = (2 / math.pi) * (a * u + b)
    path = VPCosine()
    assert torch.allclose(cosine_logsnr(u), path.logsnr(t), rtol=0, atol=1e-9)
    sigma_from_lam = torch.sigmoid(-cosine_logsnr(u)).sqrt()  # VP: sigma^2 = sigmoid(-lambda)
    assert torch.allclose(sigma_from_lam, torch.sin(0.5 * math.pi * t), rtol=0, atol=1e-12)


@pytest.mark.parametrize("s,t", [(0.1, 0.2), (0.25, 0.5), (0.0, 0.3), (0.5, 1.0), (0.9, 0.95)])
def test_cosine_sigma_ratio(s, t):
    path = VPCosine()
    ratio = float(path.sigma(torch.tensor(s, dtype=F64)) / path.sigma(torch.tensor(t, dtype=F64)))
    assert ratio == pytest.approx(math.sin(math.pi * s / 2) / math.sin(math.pi * t / 2), rel=1e-14, abs=1e-15)
