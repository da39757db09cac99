"""Consistency-model math against REFERENCES D's oracles, diffusers' LCM scalings, and a stage-level fixed point.

The fixed point: on Gaussian data the teacher's exact denoiser is closed-form; a student whose consistency function is
the teacher's own DDIM chain down the stage's grid to t = 0 satisfies f(x_{n+1}, t_{n+1}) = f(DDIM(x_{n+1}), t_n)
exactly, so the stage's distillation loss (keyed interval, teacher step, target at t_n, boundary, distance) must be
zero there to round-off, and clearly not zero for a student one grid step off.
"""
import math

import pytest
import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.diffusion.consistency import (boundary_coefficients, ct_schedule, edm_scalings, ict_steps,
                                             karras_sigmas, lcm_scalings, lognormal_interval_probs, sigma_to_t)
from difftrain.diffusion.paths import PATHS
from difftrain.diffusion.samplers import SAMPLERS, ddim_update, ode_step, time_grid
from tests.unit.stage_builds import stage_with_teacher

F64 = torch.float64
S = torch.linspace(0.3, 1.2, 3 * 4 * 4, dtype=F64).reshape(3, 4, 4)  # per-element data std, zero mean


def _var(path, t):
    return path.alpha(t).reshape(-1, 1, 1, 1) ** 2 * S**2 + path.sigma(t).reshape(-1, 1, 1, 1) ** 2


def ideal_x0(path):
    def x0_fn(x, t):
        a = path.alpha(t.double()).reshape(-1, 1, 1, 1)
        return (a * S**2 / _var(path, t.double()) * x.double()).to(x.dtype)

    return x0_fn


def test_edm_scalings_match_the_reference_values():
    c_skip, c_out, c_in = edm_scalings(torch.tensor([0.002, 1.0], dtype=F64))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # the boundary condition f(x, sigma_min) = x
    assert round(float(c_skip[1]), 6) == 0.200641 and round(float(c_out[1]), 6) == 0.446319
    assert round(float(c_in[1]), 6) == 0.894427


def test_karras_grid_matches_the_reference_values():
    s = karras_sigmas(18)
    assert [round(float(v), 3) for v in s[:3]] == [80.0, 57.586, 40.786]
    assert round(float(s[-2]), 4) == 0.0075 and float(s[-1]) == pytest.approx(0.002, abs=1e-12)
    with pytest.raises(ValueError):
        karras_sigmas(1)


def test_lcm_scalings_are_diffusers_lcm_schedulers():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for step in (0, 1, 19, 259, 999):
        ours = lcm_scalings(torch.tensor(float(step), dtype=F64))
        theirs = sched.get_scalings_for_boundary_condition_discrete(step)
        assert float(ours[0]) == pytest.approx(theirs[0], rel=1e-12, abs=1e-15)
        assert float(ours[1]) == pytest.approx(theirs[1], rel=1e-12)
    a, b = boundary_coefficients("lcm", torch.tensor([0.0, 0.259], dtype=F64), PATHS["vp_cosine"]())
    assert (a[0], b[0]) == (1.0, 0.0) and float(a[1]) < 1e-6 and float(b[1]) > 0.999999


def test_ict_doubling_schedule():
    """iCT eq. 7: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1)): 10 -> 1280 over 8 phases."""
    total = 800_000
    k_prime = math.floor(total / (math.log2(1280 / 10) + 1))
    assert k_prime == 100_000
    assert ict_steps(0, total) == 11 and ict_steps(k_prime - 1, total) == 11 and ict_steps(k_prime, total) == 21
    assert ict_steps(7 * k_prime, total) == 1281 and ict_steps(total - 1, total) == 1281
    ns = [ict_steps(k, total) for k in range(0, total, 1000)]
    assert ns == sorted(ns) and set(ns) == {10 * 2**i + 1 for i in range(8)}


def test_ct_schedule_grows_n_and_mu():
    """CM appendix C: N(0) = s0 + 0 ... N(K) = s1 + 1; mu(0) = mu0 (N = s0), mu rising towards 1 as N grows."""
    n0, mu0 = ct_schedule(0, 1000)
    n_end, mu_end = ct_schedule(1000, 1000)
    assert (n0, n_end) == (2, 151) and mu0 == pytest.approx(0.9, rel=1e-12)
    assert mu_end == pytest.approx(math.exp(2 * math.log(0.9) / 151), rel=1e-12) and mu_end > 0.998
    ns = [ct_schedule(k, 1000)[0] for k in range(0, 1001, 50)]
    assert ns == sorted(ns)


def test_stage_follows_the_ct_schedule(tmp_path):
    """``stage_args.schedule=ct``: the stage's intervals grow from ``steps`` to ``steps_max`` by CM's N(k) and its
    target network's decay is mu(k), mu0 = target_ema at k = 0; iCT's default keeps the decay fixed."""
    stage, _ = stage_with_teacher(tmp_path, "consistency", "run.steps=1000", "stage_args.steps=2",
                                  "stage_args.steps_max=150", "stage_args.schedule=ct", "stage_args.target_ema=0.9")
    for k in (0, 1, 250, 999, 1000):
        n, mu = ct_schedule(k, 1000, 3, 150, 0.9)
        assert stage.intervals(k) == n - 1 and stage.target_decay(k) == mu
    assert stage.intervals(0) == 2 and stage.intervals(1000) == 150 and stage.target_decay(0) == pytest.approx(0.9)
    assert stage.target_decay(1000) > stage.target_decay(500) > 0.9
    ict, _ = stage_with_teacher(tmp_path, "consistency", "run.steps=1000", "stage_args.steps=2",
                                "stage_args.steps_max=150", "stage_args.target_ema=0.9")
    assert ict.target_decay(500) == 0.9 and ict.intervals(0) == 2


def test_lognormal_interval_probabilities_are_the_lognormal_mass_of_each_interval():
    sigmas = karras_sigmas(41).flip(0)  # increasing
    p = lognormal_interval_probs(sigmas)
    normal = torch.distributions.Normal(torch.tensor(-1.1, dtype=F64), torch.tensor(2.0, dtype=F64))
    mass = normal.cdf(torch.log(sigmas[1:])) - normal.cdf(torch.log(sigmas[:-1]))
    torch.testing.assert_close(p, mass / mass.sum(), rtol=1e-10, atol=1e-14)
    assert p.sum().item() == pytest.approx(1.0) and int(p.argmax()) not in (0, len(p) - 1)  # mass in the middle


@pytest.mark.parametrize("path_name", ["vp_cosine", "rf", "vp_linear"])
def test_boundary_conditions_hold_on_our_paths(path_name):
    """f(x, t) = a x + b x0^ is x at the boundary whatever x0^ is: edm at sigma_e = 0.002 gives x / alpha; lcm at
    t = 0 gives x; none gives x0^ (exactly x at t = 0 for eps/v/velocity models: tested through the stage)."""
    path = PATHS[path_name]()
    t_min = sigma_to_t(torch.tensor([0.002], dtype=F64), path)
    assert float(path.sigma(t_min) / path.alpha(t_min)) == pytest.approx(0.002, rel=1e-9)
    a, b = boundary_coefficients("edm", t_min, path)
    assert float(b) == pytest.approx(0.0, abs=1e-9) and float(a * path.alpha(t_min)) == pytest.approx(1.0, rel=1e-9)
    a, b = boundary_coefficients("lcm", torch.zeros(1, dtype=F64), path)
    assert (float(a), float(b)) == (1.0, 0.0)
    a, b = boundary_coefficients("edm", torch.tensor([0.5, 1.0], dtype=F64), path)  # b -> 1 as alpha -> 0
    assert torch.isfinite(a).all() and 0 < float(b[0]) < 1 and (path_name == "vp_linear" or float(b[1]) == 1.0)
    with pytest.raises(ValueError):
        boundary_coefficients("karras", t_min, path)


@pytest.mark.parametrize("path_name", ["vp_cosine", "rf"])
def test_teacher_ode_step_converges_to_the_exact_flow(path_name):
    """DDIM and Heun steps t -> s with the exact denoiser of Gaussian data approach the exact PF-ODE map at order 1
    and 2 (the map is x_s = sqrt(v_s / v_t) x_t); a step to s = 0 is the DDIM step (x0^) for both."""
    path = PATHS[path_name]()
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    errs = {"ddim": [], "heun": []}
    for h in (0.04, 0.02, 0.01):
        t, s = torch.tensor([0.6], dtype=F64), torch.tensor([0.6 - h], dtype=F64)
        exact = (_var(path, s) / _var(path, t)).sqrt() * x
        for solver in errs:
            errs[solver].append(float((ode_step(ideal_x0(path), x, t, s, path, solver) - exact).abs().max()))
    for solver, order in (("ddim", 1), ("heun", 2)):
        slope = math.log(errs[solver][0] / errs[solver][2]) / math.log(4)
        assert abs(slope - (order + 1)) < 0.3, (solver, errs[solver])  # local error O(h^(order+1))
    t, z = torch.tensor([0.3], dtype=F64), torch.zeros(1, dtype=F64)
    for solver in errs:
        torch.testing.assert_close(ode_step(ideal_x0(path), x, t, z, path, solver), ideal_x0(path)(x, t))


def test_consistency_sampler_one_step_is_f_and_steps_renoise_with_the_given_noise():
    path = PATHS["rf"]()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    den = ideal_x0(path)
    one = SAMPLERS["consistency"](den, x_T, time_grid(1), path=path)
    torch.testing.assert_close(one, den(x_T, torch.ones(2, dtype=F64)))
    zs = [torch.randn_like(x_T) for _ in range(3)]
    seen = []
    out = SAMPLERS["lcm"](lambda x, t: seen.append((x, t)) or den(x, t), x_T, time_grid(3), path=path,
                          noise=lambda i: zs[i])
    assert [float(t[0]) for _, t in seen] == pytest.approx([1.0, 2 / 3, 1 / 3])
    a, b = boundary_coefficients("lcm", torch.tensor([1.0, 2 / 3], dtype=F64), path)
    f0 = a[0] * x_T + b[0] * den(x_T, seen[0][1])
    torch.testing.assert_close(seen[1][0], (1 / 3) * f0 + (2 / 3) * zs[0])  # re-noised to t = 2/3 with noise(0)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ the stage's exact fixed point
class _Teacher(nn.Module):
    """The exact velocity model of Gaussian data on rectified flow: v = (x - x0^) / t."""

    def __init__(self, path):
        super().__init__()
        self.x0 = ideal_x0(path)

    def forward(self, x, t, cond):
        t4 = t.double().reshape(-1, 1, 1, 1)
        return ((x.double() - self.x0(x.double(), t.double())) / t4).to(x.dtype)


class _ChainStudent(nn.Module):
    """f(x, t_k) = the teacher's DDIM chain t_k -> t_{k-1} -> ... -> 0 on the grid (``skip`` = 1: one step short),
    returned as the velocity whose x0^ = x - t v is that f (boundary none)."""

    def __init__(self, path, grid, skip=0):
        super().__init__()
        self.path, self.grid, self.skip, self.x0 = path, grid, skip, ideal_x0(path)

    def forward(self, x, t, cond):
        out = []
        for xi, ti in zip(x.double(), t.double()):
            k = int(torch.argmin((self.grid - ti).abs()))
            y = xi[None]
            for j in range(k, self.skip, -1):
                tt, ss = self.grid[j:j + 1], self.grid[j - 1:j]
                y = ddim_update(self.x0(y, tt), y, self.path.alpha(tt), self.path.sigma(tt), self.path.alpha(ss),
                                self.path.sigma(ss))
            out.append(((xi - y[0]) / ti) if ti > 0 else torch.zeros_like(xi))
        return torch.stack(out).to(x.dtype)


def _cd_stage(tmp_path, *extra):
    return stage_with_teacher(tmp_path, "consistency", "stage_args.steps=8", "diffusion.path=rf",
                              "diffusion.target=velocity", "run.seed=3", *extra)


def _loss(stage, student, teacher, step=2):
    x0 = (torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(step), dtype=F64) * S).float()
    stage.bind({"student": student, "target": student, "teacher": teacher})
    prep = stage.prepare({"x0": x0, "index": torch.arange(16), "cond": {}}, step=step)
    return stage.loss(stage.forward(prep), prep), prep


@pytest.mark.parametrize("loss", ["l2", "pseudo_huber"])
def test_distillation_loss_is_zero_at_the_exact_fixed_point(tmp_path, loss):
    stage, diffusion = _cd_stage(tmp_path, f"stage_args.loss={loss}")
    path, grid = diffusion.path, torch.linspace(0, 1, 9, dtype=F64)
    (mean, per), prep = _loss(stage, _ChainStudent(path, grid), _Teacher(path))
    ts = set(prep["t"].tolist())
    assert ts <= set(grid[1:].float().tolist()) and len(ts) > 3  # keyed intervals on the grid
    assert float(per.abs().max()) < (1e-9 if loss == "l2" else 1e-4), per
    (mean_off, _), _ = _loss(stage, _ChainStudent(path, grid, skip=1), _Teacher(path))
    assert float(mean_off) > 1e3 * max(float(mean), 1e-12)


def test_stage_config_errors_name_the_key(tmp_path):
    bad = [(["stage_args.weight=inverse_step"], "grid=karras"),
           (["stage_args.teacher_guidance=3"], "need a teacher"),
           (["stage_args.solver=heun"], "stage_args.teacher"),
           (["diffusion.target=x"], "boundary"),
           (["stage_args.steps=10", "stage_args.steps_max=5"], "steps_max"),
           (["diffusion.weighting=truncated_snr"], "diffusion.weighting"),
           (["stage_args.schedule=ct"], "stage_args.schedule' = 'ct' grows N")]
    for extra, words in bad:
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["stage=consistency", *extra])
    cfg = load_config(None, ["stage=consistency", "stage_args.boundary=lcm", "stage_args.sample_steps=4"])
    from difftrain.train.stages import STAGES

    how = STAGES["consistency"].sampling(cfg)
    assert (how.sampler, how.steps) == ("lcm", 4)
    assert STAGES["consistency"].roles(cfg) == {"student": ("trainable", "init_from"), "target": ("derived", "student")}
