"""Distribution matching distillation (DMD: Yin et al. 2024, "One-step Diffusion with Distribution Matching
Distillation", sec. 3.2, eq. 7-8; DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image
Synthesis", sec. 4.1-4.2): a one-step generator G(z) = x0^(z, t = 1) whose samples' distribution is pulled towards the
teacher's by the difference of two scores at noised generator samples:

* the **real score**: the frozen teacher's data prediction at (x_t, t), under CFG at ``teacher_guidance``;
* the **fake score**: a second trainable network (``fake``, initialised from the teacher) that tracks the generator's
  current distribution by denoising its samples (the plain diffusion loss on x0 = sg(G(z))).

The generator's gradient (eq. 7, with DMD's per-sample normalisation of eq. 8) is
``g = (x0_fake - x0_real) / mean|G(z) - x0_real|`` at x_t = alpha(t) sg(G(z)) + sigma(t) eps, t ~ U[t_min, t_max],
applied through the surrogate loss 0.5 ||G(z) - sg(G(z) - g)||^2 whose gradient in G(z) is g. The two networks
alternate, each with its own AdamW state (the engine's one optimizer steps only the parameters that got a gradient):
``fake_updates`` fake-score steps per generator step (DMD2's two time-scale update rule). ``regression > 0`` adds
DMD's regression loss, ``regression * ||G(z) - x^||^2`` on a teacher's (noise z, sample x^) pairs (the reflow pairs
of ``difftrain distill pairs``, read with ``data.kind=latent``): then z is the pair's noise. The served model is the
generator's EMA, sampled with one DDIM step from t = 1 (x = x0^).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.config import ConfigError, identity
from difftrain.diffusion.keyed import keyed_rand, keyed_randn
from difftrain.train.stages.base import FROZEN, TRAINABLE, ModuleSpec, SamplingDefaults
from difftrain.train.stages.pretrain import _stream_seed
from difftrain.train.stages.teacher import TeacherStage


@dataclass
class DMDArgs:
    teacher: str = identity("")  # RUN@ema | RUN@raw | an export folder: the real score; required
    teacher_guidance: float = identity(1.0)  # the real score's CFG scale (uncond + w (cond - uncond))
    fake_updates: int = identity(5, ge=1)  # fake-score steps per generator step (DMD2's TTUR)
    t_min: float = identity(0.02, gt=0.0, lt=1.0)  # the noise levels the two scores are compared at
    t_max: float = identity(0.98, gt=0.0, le=1.0)
    regression: float = identity(0.0, ge=0.0)  # weight of the l2 regression on (noise, sample) pairs (DMD sec. 3.3)


class DMDStage(TeacherStage):
    name = "dmd"
    args_class = DMDArgs
    served = trained = "generator"
    pipeline_refusal = "it trains two networks (the generator and the fake score) and reads the whole teacher"

    def __init__(self, shared, args: DMDArgs):
        super().__init__(shared, args)
        self.dmd_seed = _stream_seed(self.seed, "dmd")  # the noise at which the scores are compared

    @classmethod
    def check(cls, cfg) -> None:
        a = cls.parse_args(cfg)
        if not a.teacher:
            raise ConfigError("config key 'stage_args.teacher' is required by stage 'dmd' (RUN@ema, RUN@raw or an "
                              "export folder)")
        if not a.t_min < a.t_max:
            raise ConfigError(f"config keys 'stage_args.t_min' = {a.t_min} and 't_max' = {a.t_max}: need "
                              "t_min < t_max")
        if a.regression > 0 and cfg.data.kind != "latent":
            raise ConfigError(f"config key 'stage_args.regression' = {a.regression} needs a teacher's (noise, sample) "
                              "pairs as data (difftrain distill pairs; data.kind=latent)")
        if cfg.diffusion.target == "eps":
            raise ConfigError("config key 'diffusion.target' = 'eps': a one-step generator predicts from pure noise, "
                              "where eps says nothing about x0 (alpha = 0); use v, velocity or x")

    @classmethod
    def roles(cls, cfg) -> dict[str, tuple[str, str]]:
        return {"generator": (TRAINABLE, "init_from"), "fake": (TRAINABLE, "stage_args.teacher"),
                "teacher": (FROZEN, "stage_args.teacher")}

    @classmethod
    def sampling(cls, cfg) -> SamplingDefaults:
        return SamplingDefaults("ddim", 1, cls.guidance(cfg, cls.parse_args(cfg)))

    def modules(self) -> dict[str, ModuleSpec]:
        mods = super().modules()  # student (from init_from or the teacher) and the teacher
        return {"generator": mods["student"], "fake": self.shared.backbone_spec(self.source),
                "teacher": mods["teacher"]}

    def generator_step(self, step: int) -> bool:
        return step % (self.args.fake_updates + 1) == self.args.fake_updates

    def _z(self, batch: dict, step: int) -> torch.Tensor:
        """The generator's input noise: the pair's own with regression pairs, else keyed like pre-training's."""
        if self.args.regression > 0:
            if "noise" not in batch:
                raise ConfigError("config key 'data.train': stage 'dmd' with stage_args.regression > 0 needs pair "
                                  "shards whose samples hold 'noise' (difftrain distill pairs); these have none")
            return batch["noise"].to(batch["x0"])
        return self.noise(batch, step)

    def _generate(self, z: torch.Tensor, cond: dict, pred=None) -> torch.Tensor:
        ones = torch.ones(len(z), device=z.device, dtype=z.dtype)
        pred = self.live["generator"](z, ones, cond) if pred is None else pred
        return self.diffusion.sample_x0(pred.float(), z.float(), ones.float())

    def prepare(self, batch: dict, step: int) -> dict:
        x0, cond = batch["x0"], batch["cond"]
        z = self._z(batch, step)
        u = keyed_rand(self.dmd_seed, step, batch["index"], "t", torch.float64)
        t = (self.args.t_min + (self.args.t_max - self.args.t_min) * u).to(x0)
        eps = keyed_randn(self.dmd_seed, step, batch["index"], x0.shape[1:], "noise").to(x0)
        _, w, uncond = self.guided(batch, step, x0)  # the real score's CFG scale and null condition
        prep = {"z": z, "x0": x0, "t": t, "eps": eps, "cond": cond, "w": w, "uncond": uncond, "weight": None,
                "generator": self.generator_step(step)}
        if not prep["generator"]:  # the fake score denoises the generator's current samples
            with torch.no_grad():
                x_g = self._generate(z, cond).to(x0)
            prep.update(x0=x_g, x_t=self.diffusion.add_noise(x_g, eps, t))
        return prep

    def forward(self, prep: dict) -> torch.Tensor:
        if prep["generator"]:
            ones = torch.ones(len(prep["z"]), device=prep["z"].device, dtype=prep["z"].dtype)
            return self.live["generator"](prep["z"], ones, prep["cond"])
        return self.live["fake"](prep["x_t"], prep["t"], prep["cond"])

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if not prep["generator"]:
            per = self.diffusion.loss(pred.float(), prep["x0"], prep["eps"], prep["t"])
            return per.mean(), per.detach()
        x_g = self._generate(prep["z"], prep["cond"], pred=pred)
        t, cond = prep["t"], prep["cond"]
        with torch.no_grad():
            x_t = self.diffusion.add_noise(x_g.detach(), prep["eps"].float(), t.float())
            real = self.teacher_x0(cond, prep["w"], prep["uncond"], x_t.dtype)(x_t, t)
            fake = self.diffusion.sample_x0(self.live["fake"](x_t, t, cond).float(), x_t, t.float()).double()
            dims = tuple(range(1, x_g.ndim))
            scale = (x_g.detach().double() - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)
            grad = torch.nan_to_num((fake - real) / scale).float()  # DMD eq. 7-8
        per = 0.5 * (x_g - (x_g - grad).detach()).square().flatten(1).mean(1)
        if self.args.regression > 0:
            per = per + self.args.regression * (x_g - prep["x0"].float()).square().flatten(1).mean(1)
        return per.mean(), per.detach()
