"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student of N sampling steps learns to do in one
DDIM step what its teacher does in two; rounds N -> N/2 -> ... -> 1 chain stages, each round's student the next
one's teacher (a campaign: ``from:`` the previous round).

Per sample: t is one of the student's grid points ``time_grid(N, 1, 0)[i]`` (i keyed by seed, step and sample), the
teacher takes two DDIM steps t -> t_mid -> t_end over its own 2N-step grid (which contains the student's), and the
student's x target is the x~ for which one DDIM step from (x_t, t) lands on the teacher's z_end
(``diffusion/progressive.py``, REFERENCES E). The student regresses x~ in its own output space
(``diffusion.target``: x or v; eps is refused, it explodes as alpha -> 0), weighted by ``diffusion.weighting``
(``truncated_snr`` = max(SNR, 1), the paper's choice). It samples with DDIM on the same N-step grid it was
trained on (``Stage.sampling``). A guided teacher is distilled at a fixed CFG scale (``stage_args.teacher_guidance``;
the student then samples without CFG) or, as in Meng et al. 2023's first stage, over a range of scales
(``stage_args.guidance_range: [w_min, w_max]``, w keyed per sample): the student takes w as an input
(``model.args.guidance_embed``, zero-initialised, so it starts as its flagless teacher) and samples with the run's
``run.sample_guidance`` as that input, in one forward per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.config import ConfigError, identity
from difftrain.diffusion.keyed import keyed_rand
from difftrain.train.stages.base import SamplingDefaults
from difftrain.train.stages.teacher import TeacherStage


@dataclass
class ProgressiveArgs:
    teacher: str = identity("")  # RUN@ema | RUN@raw | an export folder (train/sources.py); required
    steps: int = identity(1, ge=1)  # the student's DDIM steps N; the teacher takes 2N
    teacher_guidance: float = identity(1.0)  # the teacher's CFG scale (uncond + w (cond - uncond)); 1 = unguided
    guidance_range: list = identity([])  # [w_min, w_max]: w per sample, an input of the student (guidance_embed)


class ProgressiveStage(TeacherStage):
    name = "progressive"
    args_class = ProgressiveArgs
    teacher_keys = ("z_end",)

    def __init__(self, shared, args: ProgressiveArgs):
        super().__init__(shared, args)
        from difftrain.diffusion.progressive import round_steps

        # student step i: t[i] -> t_end[i] on its N-step grid; the teacher's 2N-step grid passes t_mid[i] (float64)
        self.t_start, self.t_mid, self.t_end = round_steps(args.steps)

    @classmethod
    def check(cls, cfg) -> None:
        args = cls.parse_args(cfg)
        if not args.teacher:
            raise ConfigError("config key 'stage_args.teacher' is required by stage 'progressive' (RUN@ema, RUN@raw "
                              "or an export folder)")
        cls.check_guidance(cfg, args)
        if cfg.diffusion.target not in ("x", "v", "x_eps"):
            raise ConfigError(f"config key 'diffusion.target' = '{cfg.diffusion.target}': a progressive student "
                              "predicts x, v or both (x_eps) (Salimans & Ho 2022, sec. 4: eps explodes as alpha -> 0)")

    @classmethod
    def sampling(cls, cfg) -> SamplingDefaults:
        a = cls.parse_args(cfg)
        return SamplingDefaults("ddim", a.steps, cls.guidance(cfg, a))

    @classmethod
    def teacher_evaluations(cls, args) -> int:
        return 2  # two DDIM steps

    def draw_t(self, batch: dict, step: int) -> torch.Tensor:
        """The index of each sample's student step (keyed), as a float tensor [B] (prepare maps it to times)."""
        u = keyed_rand(self.seed, step, batch["index"], "t", torch.float64)
        return (u * self.args.steps).floor().clamp(max=self.args.steps - 1)

    def _start(self, batch: dict, step: int):
        """Each sample's (x_t, t in float64, t_mid, t_end, eps): keyed, identical wherever it is computed."""
        x0 = batch["x0"]
        eps = self.noise(batch, step)
        i = self.draw_t(batch, step).long()
        t64 = self.t_start[i]
        return self.diffusion.add_noise(x0, eps, t64.to(x0)), t64, self.t_mid[i], self.t_end[i], eps

    @torch.no_grad()
    def teacher_work(self, batch: dict, step: int) -> dict:
        """The teacher's two DDIM steps t -> t_mid -> t_end from x_t: ``z_end`` (float64)."""
        from difftrain.diffusion.progressive import teacher_two_steps

        x0 = batch["x0"]
        x_t, t64, mid64, end64, _ = self._start(batch, step)
        cond, w, uncond = self.guided(batch, step, x0)
        teacher_x0 = self.teacher_x0(cond, w, uncond, x0.dtype)
        return {"z_end": teacher_two_steps(teacher_x0, x_t.double(), t64, mid64, end64, self.diffusion.path)}

    def prepare(self, batch: dict, step: int) -> dict:
        from difftrain.diffusion.progressive import progressive_target

        x0 = batch["x0"]
        x_t, t64, _, end64, _ = self._start(batch, step)
        cond, _, _ = self.guided(batch, step, x0)
        z_end = self.teacher_outputs(batch, step)["z_end"].double()
        path = self.diffusion.path
        with torch.no_grad():  # x~ in float64
            x_tilde = progressive_target(x_t.double(), t64, z_end, end64, path)
            shape = (-1,) + (1,) * (x0.ndim - 1)
            a, s = path.alpha(t64).reshape(shape), path.sigma(t64).reshape(shape)
            eps_tilde = (x_t.double() - a * x_tilde) / s  # the noise consistent with x~ at (x_t, t): t > 0 here
        return {"x0": x_tilde.to(x0), "eps": eps_tilde.to(x0), "t": t64.to(x0), "x_t": x_t, "cond": cond,
                "weight": None}
