"""Data-free distillation along the teacher's own sampling trajectories (EfficientDM: He et al. 2023,
arXiv:2310.03270, sec. 3.3): the frozen full-precision teacher samples from pure noise, and the student (typically
quantised: ``adapt: [{kind: qat, ...}]``, initialised from the teacher) learns to give the teacher's output at the
points the teacher's sampler visits. No training image is read: the data set only supplies each sample's condition
(a class label or a caption, with ``data.caption_dropout``'s null conditions, which a student that samples with CFG
needs matched too).

Per sample: the noise x_T ~ N(0, I) (keyed by seed, step and sample index: the frozen batch's ``x0`` in this stage
is x_T, of the model's sample shape; the images are neither read nor encoded) and a grid index i in [0, N) (keyed
on the ``t`` stream). The teacher integrates from x_T over the N-step grid ``samplers.time_grid(N, 1, 0)`` with one
of our samplers (``samplers.SAMPLERS``: the sampler its run samples with, or ``stage_args.sampler``); a batch runs
once for max(i) + 1 steps and keeps each sample's x_{t_i} together with the teacher's raw output there (its
prediction in the model's own output space, under CFG at ``teacher_guidance``): the last evaluation the sampler
made at t_i, which for every sampler here is the one at the step's start point x_{t_i} (Heun's predictor at t_i
comes before it). The loss is the plain MSE between the student's raw output at (x_{t_i}, t_i, cond) and the
teacher's. The trajectory and the teacher's outputs read no live weights: they are frozen work (``teacher_keys``),
prefetched into a pipeline's bubbles like progressive distillation's teacher steps.

The student samples as its teacher: the teacher's sampler and N (``stage_args.sampler`` / ``steps`` when set), at
the teacher's guidance (1 when a ``teacher_guidance`` != 1 was distilled in).

**PTQ baseline**: this stage with ``optim.lr=0`` is calibration only. A qat student's activation step sizes are
calibrated from its first training forwards (``quant.modules.ActQuant``), which here see trajectory activations at
several t (per t-interval with ``t_intervals`` > 1); with lr = 0 AdamW moves nothing (its decoupled decay is lr
times the weight decay), so the run's weights, weight step sizes and trained log step sizes stay exactly the
teacher's and the quantisers' initial ones, and only the calibration buffers (``step0``, ``zero0``, ``stat``,
``calibrated``) change (tested).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from difftrain.config import ConfigError, identity
from difftrain.diffusion.keyed import keyed_rand, keyed_randn
from difftrain.diffusion.samplers import SAMPLERS, STOCHASTIC, time_grid
from difftrain.train.stages.base import FrozenPiece, SamplingDefaults
from difftrain.train.stages.teacher import TeacherStage

ODE_SAMPLERS = tuple(s for s in SAMPLERS if s not in STOCHASTIC)  # a trajectory needs no fresh noise per step


@dataclass
class TrajectoryArgs:
    teacher: str = identity("")  # RUN@ema | RUN@raw | an export folder (train/sources.py); required
    steps: int = identity(0, ge=0)  # the teacher's N-step grid; 0: the steps the teacher samples with
    sampler: str = identity("", ("", *ODE_SAMPLERS))  # "": the teacher's own (ddim if it samples stochastically)
    teacher_guidance: float = identity(1.0)  # the teacher's CFG scale (uncond + w (cond - uncond)); 1 = unguided


def teacher_sampling(cfg, args: TrajectoryArgs) -> tuple[str, int]:
    """(sampler, N) of the teacher's trajectories: ``stage_args.sampler`` / ``steps`` where set, else how the teacher
    samples (its checkpoint's or export's saved sampling; the run's ``run.sample_*`` when it cannot be read); a
    stochastic (consistency) sampler is replaced by ddim."""
    from difftrain.train.sources import Source

    own = SamplingDefaults(cfg.run.sample_sampler, cfg.run.sample_steps, cfg.run.sample_guidance)
    if args.teacher and not (args.sampler and args.steps):
        try:
            own = Source.parse("stage_args.teacher", args.teacher).sampling(cfg.run.sample_guidance)
        except (ConfigError, OSError, ValueError):
            pass
    sampler = args.sampler or (own.sampler if own.sampler in ODE_SAMPLERS else "ddim")
    return sampler, args.steps or own.steps


class TrajectoryStage(TeacherStage):
    name = "trajectory"
    args_class = TrajectoryArgs
    teacher_keys = ("x_i", "pred_i")  # each sample's trajectory point and the teacher's raw output there
    loss_keys = ("target", "weight")

    def __init__(self, shared, args: TrajectoryArgs):
        super().__init__(shared, args)
        self.sampler, self.steps = teacher_sampling(shared.cfg, args)
        self.grid = time_grid(self.steps, 1.0, 0.0)  # float64 [N + 1], as difftrain sample steps
        tcfg = self.source.config() if self.source is not None else None
        if tcfg is not None and tcfg.diffusion.target != shared.cfg.diffusion.target:
            raise ConfigError(f"config key 'diffusion.target' = '{shared.cfg.diffusion.target}', but the teacher "
                              f"'{args.teacher}' predicts '{tcfg.diffusion.target}': the student matches the "
                              "teacher's raw output, so it must predict the same target")

    @classmethod
    def check(cls, cfg) -> None:
        a = cls.parse_args(cfg)
        if not a.teacher:
            raise ConfigError("config key 'stage_args.teacher' is required by stage 'trajectory' (RUN@ema, RUN@raw "
                              "or an export folder)")
        if cfg.diffusion.weighting != "none":
            raise ConfigError(f"config key 'diffusion.weighting' = '{cfg.diffusion.weighting}': stage 'trajectory' "
                              "regresses the teacher's output with the plain MSE (EfficientDM); use none")
        if cfg.diffusion.assign != "none":
            raise ConfigError(f"config key 'diffusion.assign' = '{cfg.diffusion.assign}': stage 'trajectory' has no "
                              "data to assign noise to (its samples start from the teacher's noise); use none")

    @classmethod
    def sampling(cls, cfg) -> SamplingDefaults:
        a = cls.parse_args(cfg)
        sampler, steps = teacher_sampling(cfg, a)
        return SamplingDefaults(sampler, steps, cls.guidance(cfg, a))

    @classmethod
    def teacher_forwards(cls, cfg) -> int:
        """At most N teacher evaluations per batch (max(i) + 1 steps; Heun: two per step), twice under CFG."""
        a = cls.parse_args(cfg)
        sampler, steps = teacher_sampling(cfg, a)
        branches = 2 if cfg.model.cond != "none" and a.teacher_guidance != 1.0 else 1
        return (2 if sampler == "heun" else 1) * steps * branches

    @torch.no_grad()
    def _x0(self, batch: dict, step: int) -> torch.Tensor:
        """Data-free: the trajectory's start x_T ~ N(0, I) of the model's sample shape, keyed by (seed, step, sample
        index) on the noise stream; the batch's images are neither read nor encoded."""
        from difftrain.sampling import sample_shape

        shape = sample_shape(self.shared.acfg)
        return keyed_randn(self.seed, step, batch["index"], shape, "noise").to(self.device)

    def frozen_pieces(self, step: int) -> list[FrozenPiece]:
        """As the other teacher stages', with no VAE to hold: the ``latents`` piece only draws x_T."""
        return [dataclasses.replace(p, module=None) if p.name == "latents" else p for p in super().frozen_pieces(step)]

    def draw_index(self, batch: dict, step: int) -> torch.Tensor:
        """Each sample's grid index i in [0, N) (long [B], keyed)."""
        u = keyed_rand(self.seed, step, batch["index"], "t", torch.float64)
        return (u * self.steps).floor().long().clamp(max=self.steps - 1)

    @torch.no_grad()
    def teacher_work(self, batch: dict, step: int) -> dict:
        """The teacher's trajectories from x_T (``batch["x0"]``) for max(i) + 1 steps of its sampler: each sample's
        point ``x_i`` = x_{t_i} and the teacher's raw (guided) output ``pred_i`` there."""
        from difftrain.diffusion.guidance import guided_denoiser

        x_T = batch["x0"]
        i = self.draw_index(batch, step)
        cond, w, uncond = self.guided(batch, step, x_T)
        pred_fn = guided_denoiser(self.live["teacher"], cond, uncond, w)  # in the model's own output space
        t_i = self.grid[i].to(device=x_T.device, dtype=torch.promote_types(x_T.dtype, torch.float32))
        rows = (-1,) + (1,) * (x_T.ndim - 1)
        kept: dict[str, torch.Tensor] = {}

        def denoise(x, t):  # the sampler's t is exactly a grid time cast to its dtype: compared without a sync
            pred = pred_fn(x, t)
            here = (t == t_i).reshape(rows)
            kept["x_i"] = torch.where(here, x, kept.get("x_i", x))
            kept["pred_i"] = torch.where(here, pred, kept.get("pred_i", torch.zeros_like(pred)))
            return self.teacher_diffusion.sample_x0(pred, x, t).float()

        last = int(i.max()) + 1  # one step past the furthest point: the sampler evaluates there last
        SAMPLERS[self.sampler](denoise, x_T, self.grid[: last + 1].to(x_T.device), path=self.teacher_diffusion.path)
        return {"x_i": kept["x_i"].to(x_T.dtype), "pred_i": kept["pred_i"]}

    def prepare(self, batch: dict, step: int) -> dict:
        x_T = batch["x0"]
        out = self.teacher_outputs(batch, step)
        t = self.grid[self.draw_index(batch, step)].to(x_T)
        return {"x_t": out["x_i"], "t": t, "cond": batch["cond"], "target": out["pred_i"], "weight": None}

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from difftrain.diffusion.diffusion import DISTANCES

        per = DISTANCES["l2"](pred.float(), prep["target"].float())
        if prep["weight"] is not None:  # a pipeline's padding rows weigh 0
            per = per * prep["weight"].to(per)
        return per.mean(), per.detach()
