"""Consistency distillation and consistency training (Song et al. 2023, "Consistency Models", Alg. 2 and 3; iCT,
Song & Dhariwal 2023; LCM, Luo et al. 2023): a student f(x_t, t) that maps every point of an ODE trajectory to its
start, so that one evaluation from noise is a sample and a few, re-noising in between, refine it.

Per sample: an interval n of the discretisation t_0 < t_1 < ... < t_N (keyed: uniform over n, or iCT's lognormal
probabilities), x_{n+1} = alpha(t_{n+1}) x0 + sigma(t_{n+1}) eps, and its neighbour on the trajectory at t_n:

* **distillation** (``stage_args.teacher`` set): one step of the frozen teacher's probability-flow ODE from t_{n+1}
  to t_n (DDIM, or Heun with two teacher evaluations), at its CFG scale ``teacher_guidance`` or at w drawn per sample
  from ``guidance_range`` that the student also takes as an input (LCM's w-embedding; ``model.args.guidance_embed``).
  A uniform grid of N = 50 intervals is LCM's skipping-step solver (k = 20 of 1000 timesteps).
* **training** (no teacher): x_n = alpha(t_n) x0 + sigma(t_n) eps with the same eps, the one-sample estimate of the
  teacher's step (CM Alg. 3); iCT: ``steps`` doubling to ``steps_max`` over the run (``consistency.ict_steps``), the
  Karras grid, lognormal interval sampling, weight 1 / (sigma_{n+1} - sigma_n), pseudo-Huber, ``target_ema = 0``;
  or the original CT's schedule (``schedule=ct``: N(k) from ``steps`` to ``steps_max`` and the target's decay
  mu(k) = exp(s0 ln mu0 / N(k)), mu0 = ``target_ema``; CM appendix C).

The loss is d(f_theta(x_{n+1}, t_{n+1}), f_target(x_n, t_n)) with the target network (``target``, a derived module:
an EMA of the student of decay ``target_ema`` updated after every applied step), or for ``target_ema = 0`` the
student itself without gradient (iCT), evaluated in ``forward`` next to the student's ([student; target] rows: a
pipeline carries the target's rows through its segments, ``Stage.carried``). The teacher's step is frozen work
(``teacher_work``: prefetched into a pipeline's bubbles); the target's forward reads live weights and is not.
f = a(t) x + b(t) x0^
with the boundary scalings of ``stage_args.boundary`` (``diffusion/consistency.py``). The served student is the EMA of
the student (as in CM, separate from the target network) and samples with the multistep consistency sampler of its
boundary (``consistency``, ``lcm`` or ``consistency_edm``) in ``sample_steps`` steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.config import ConfigError, identity
from difftrain.diffusion.consistency import (BOUNDARIES, SAMPLER_OF, boundary_coefficients, ct_schedule, ict_steps,
                                             karras_sigmas, lognormal_interval_probs, sigma_to_t)
from difftrain.diffusion.diffusion import DISTANCES
from difftrain.diffusion.keyed import keyed_rand
from difftrain.diffusion.samplers import ode_step
from difftrain.train.stages.base import DERIVED, ModuleSpec, SamplingDefaults
from difftrain.train.stages.teacher import TeacherStage


@dataclass
class ConsistencyArgs:
    teacher: str = identity("")  # distillation: RUN@ema | RUN@raw | an export folder; "": consistency training
    solver: str = identity("ddim", ("ddim", "heun"))  # distillation: the teacher's ODE step t_{n+1} -> t_n
    grid: str = identity("uniform", ("uniform", "karras"))  # t_n = n / N | Karras sigmas (0.002 .. 80, rho 7)
    steps: int = identity(50, ge=1)  # N intervals (LCM: 50; CD on CIFAR: 17, i.e. 18 Karras levels)
    steps_max: int = identity(0, ge=0)  # > 0: N grows from steps to steps_max over run.steps (by `schedule`)
    schedule: str = identity("ict", ("ict", "ct"))  # with steps_max: iCT's doubling N | CM's N(k) and mu(k)
    target_ema: float = identity(0.95, ge=0.0, lt=1.0)  # the target network's decay mu; 0: the student (iCT)
    boundary: str = identity("none", BOUNDARIES)  # f = a x + b x0^ (diffusion/consistency.py)
    loss: str = identity("l2", tuple(DISTANCES))  # l2 | pseudo_huber
    weight: str = identity("none", ("none", "inverse_step"))  # inverse_step: 1 / (sigma_{n+1} - sigma_n) (iCT)
    t_sampling: str = identity("uniform", ("uniform", "lognormal"))  # lognormal: iCT's interval probabilities
    sample_steps: int = identity(1, ge=1)  # the served student's steps (its NFE)
    teacher_guidance: float = identity(1.0)  # the teacher's CFG scale (uncond + w (cond - uncond)); 1 = unguided
    guidance_range: list = identity([])  # [w_min, w_max]: w per sample, an input of the student (guidance_embed)


class ConsistencyStage(TeacherStage):
    name = "consistency"
    args_class = ConsistencyArgs
    loss_keys = ("x_t", "t", "x_lo", "t_lo", "weight")
    teacher_keys = ("x_lo",)
    def __init__(self, shared, args: ConsistencyArgs):
        super().__init__(shared, args)
        self.total = shared.cfg.run.steps
        self._grids: dict[int, tuple] = {}

    @classmethod
    def check(cls, cfg) -> None:
        a = cls.parse_args(cfg)
        cls.check_guidance(cfg, a)
        if not a.teacher:
            if a.guidance_range or a.teacher_guidance != 1.0:
                raise ConfigError("config keys 'stage_args.guidance_range' / 'teacher_guidance' need a teacher "
                                  "(stage_args.teacher): consistency training has no guided ODE to follow")
            if a.solver != "ddim":
                raise ConfigError(f"config key 'stage_args.solver' = '{a.solver}' is the teacher's ODE step: set "
                                  "stage_args.teacher (consistency training has none)")
        if a.boundary == "none" and cfg.diffusion.target in ("x", "x_eps"):
            raise ConfigError(f"config key 'stage_args.boundary' = 'none' with diffusion.target = "
                              f"'{cfg.diffusion.target}': f = x0^ is x itself at t = 0 only for eps, v or velocity "
                              "models; use boundary lcm or edm")
        if a.grid != "karras" and (a.weight != "none" or a.t_sampling != "uniform"):
            raise ConfigError("config keys 'stage_args.weight' = inverse_step and 't_sampling' = lognormal are "
                              "defined on noise levels sigma: set stage_args.grid=karras")
        if a.schedule == "ct" and not (a.steps_max and a.target_ema > 0):
            raise ConfigError("config key 'stage_args.schedule' = 'ct' grows N to stage_args.steps_max and the "
                              "target network's decay from stage_args.target_ema (mu0): set both > 0")
        if a.steps_max and a.steps_max < a.steps:
            raise ConfigError(f"config key 'stage_args.steps_max' = {a.steps_max} must be 0 or >= stage_args.steps "
                              f"= {a.steps}")
        if cfg.diffusion.weighting != "none":
            raise ConfigError(f"config key 'diffusion.weighting' = '{cfg.diffusion.weighting}': a consistency loss "
                              "is weighted by stage_args.weight (none | inverse_step)")

    @classmethod
    def sampling(cls, cfg) -> SamplingDefaults:
        a = cls.parse_args(cfg)
        return SamplingDefaults(SAMPLER_OF[a.boundary], a.sample_steps, cls.guidance(cfg, a))

    @classmethod
    def teacher_evaluations(cls, args) -> int:
        return 2 if args.solver == "heun" else 1

    def modules(self) -> dict[str, ModuleSpec]:
        mods = super().modules()
        if self.args.target_ema > 0:  # the target network: a copy of the student moved by after_step
            mods["target"] = ModuleSpec(DERIVED, meta=mods["student"].meta, of="student")
        return mods

    @classmethod
    def roles(cls, cfg) -> dict[str, tuple[str, str]]:
        out = super().roles(cfg)
        if cls.parse_args(cfg).target_ema > 0:
            out["target"] = (DERIVED, "student")
        return out

    def after_step(self, step: int, ok: torch.Tensor) -> None:
        if self.args.target_ema > 0:
            from difftrain.train.ema import follow

            follow(self.live["target"], self.live["student"], self.target_decay(step), ok)

    def _ct(self, step: int) -> tuple[int, float]:
        """CM's schedule (appendix C): s0 = steps + 1 points at k = 0, steps_max + 1 at the end (s1 = steps_max), mu0 =
        target_ema."""
        return ct_schedule(step, self.total, self.args.steps + 1, self.args.steps_max, self.args.target_ema)

    def intervals(self, step: int) -> int:
        """N at this step: ``steps``; with ``steps_max`` iCT's doubling from ``steps`` to ``steps_max`` over the run
        (``schedule=ict``), or the original CT's N(k) (``schedule=ct``)."""
        if not self.args.steps_max:
            return self.args.steps
        if self.args.schedule == "ct":
            return self._ct(step)[0] - 1
        return ict_steps(step, self.total, self.args.steps, self.args.steps_max) - 1

    def target_decay(self, step: int) -> float:
        """The target network's decay after ``step``: ``target_ema``, or CT's mu(k) = exp(s0 ln mu0 / N(k))."""
        if self.args.schedule == "ct" and self.args.steps_max:
            return self._ct(step)[1]
        return self.args.target_ema

    def grid(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(t [N+1] increasing float64 with t_N = 1, sigma [N+1] or None, interval probabilities [N] or None).
        Karras: t_n = t(sigma_n) for sigma from 0.002 up to 80, the top level moved to t = 1 where the sampler
        starts (pure noise; sigma 80 leaves ~1% of the signal on rectified flow), its sigma kept for the weights."""
        if n not in self._grids:
            if self.args.grid == "uniform":
                self._grids[n] = (torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64), None, None)
            else:
                sigma = karras_sigmas(n + 1).flip(0)
                t = sigma_to_t(sigma, self.diffusion.path)
                t[-1] = 1.0
                probs = lognormal_interval_probs(sigma) if self.args.t_sampling == "lognormal" else None
                self._grids[n] = (t, sigma, probs)
        return self._grids[n]

    def draw_interval(self, batch: dict, step: int, n: int, probs: torch.Tensor | None) -> torch.Tensor:
        """Each sample's interval index in [0, N) (keyed): uniform, or by inverting iCT's interval CDF."""
        u = keyed_rand(self.seed, step, batch["index"], "t", torch.float64)
        if probs is None:
            return (u * n).long().clamp(max=n - 1)
        return torch.searchsorted(torch.cumsum(probs, 0), u, right=True).clamp(max=n - 1)

    def consistency_fn(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = a(t) x + b(t) x0^ from the model's output ``pred`` at (x, t)."""
        x0 = self.diffusion.sample_x0(pred.float(), x.float(), t.float())
        a, b = (c.to(x0).reshape((-1,) + (1,) * (x0.ndim - 1))
                for c in boundary_coefficients(self.args.boundary, t.double(), self.diffusion.path))
        return a * x.float() + b * x0

    def _start(self, batch: dict, step: int):
        """Each sample's interval: (n, t_{n+1}, t_n in float64, sigma or None, eps, x_{t_{n+1}}), all keyed."""
        x0 = batch["x0"]
        eps = self.noise(batch, step)
        n_int = self.intervals(step)
        ts, sigma, probs = self.grid(n_int)
        n = self.draw_interval(batch, step, n_int, probs)
        t_hi64, t_lo64 = ts[n + 1], ts[n]
        return n, t_hi64, t_lo64, sigma, eps, self.diffusion.add_noise(x0, eps, t_hi64.to(x0))

    @torch.no_grad()
    def teacher_work(self, batch: dict, step: int) -> dict:
        """The teacher's ODE step t_{n+1} -> t_n from x_{t_{n+1}} (float64 arithmetic): ``x_lo``."""
        x0 = batch["x0"]
        _, t_hi64, t_lo64, _, _, x_hi = self._start(batch, step)
        cond, w, uncond = self.guided(batch, step, x0)
        return {"x_lo": ode_step(self.teacher_x0(cond, w, uncond, x0.dtype), x_hi.double(), t_hi64, t_lo64,
                                 self.diffusion.path, self.args.solver).to(x0)}

    @classmethod
    def carried(cls, cfg) -> str:
        return "target" if cls.parse_args(cfg).target_ema > 0 else "student"

    def prepare(self, batch: dict, step: int) -> dict:
        x0 = batch["x0"]
        n, t_hi64, t_lo64, sigma, eps, x_hi = self._start(batch, step)
        t_hi, t_lo = t_hi64.to(x0), t_lo64.to(x0)
        cond, _, _ = self.guided(batch, step, x0)
        if self.source is not None:  # the teacher's step (frozen work)
            x_lo = self.teacher_outputs(batch, step)["x_lo"].to(x0)
        else:  # consistency training: the same noise at t_n
            x_lo = self.diffusion.add_noise(x0, eps, t_lo)
        weight = None
        if self.args.weight == "inverse_step":
            weight = (1.0 / (sigma[n + 1] - sigma[n])).to(x0)
        return {"x0": x0, "eps": eps, "t": t_hi, "x_t": x_hi, "cond": cond, "x_lo": x_lo, "t_lo": t_lo,
                "weight": weight}

    def model_inputs(self, prep: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The student's rows (x_{n+1}, t_{n+1}) then the target's (x_n, t_n), the condition for both: a pipeline
        carries the target's rows through its segments (``Stage.carried``)."""
        return (torch.cat([prep["x_t"], prep["x_lo"]]), torch.cat([prep["t"], prep["t_lo"]]),
                {k: torch.cat([v, v]) for k, v in prep["cond"].items()})

    def forward(self, prep: dict) -> torch.Tensor:
        """[the student's prediction at (x_{n+1}, t_{n+1}); the target's at (x_n, t_n), without gradient]."""
        pred = self.live["student"](prep["x_t"], prep["t"], prep["cond"])
        with torch.no_grad():
            target = self.live[self.carried(self.shared.cfg)](prep["x_lo"], prep["t_lo"], prep["cond"])
        return torch.cat([pred, target])

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(prep["x_t"])
        f = self.consistency_fn(pred[:b], prep["x_t"], prep["t"])
        f_target = self.consistency_fn(pred[b:].detach(), prep["x_lo"], prep["t_lo"])
        per = DISTANCES[self.args.loss](f, f_target)
        if prep["weight"] is not None:
            per = per * prep["weight"].to(per)
        return per.mean(), per.detach()
