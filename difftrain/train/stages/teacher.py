"""What the teacher-based stages share (progressive distillation, consistency distillation): the frozen teacher read
from a :class:`~difftrain.train.sources.Source` (``stage_args.teacher``), its path checked against the student's, its
CFG scale (one fixed ``teacher_guidance``, or w per sample from ``guidance_range`` as the student's input: Meng et
al. 2023's guided distillation, LCM's w-embedding), and how the student then samples with guidance.

The scale convention is ours throughout: x^ = uncond + w (cond - uncond), w = 1 unguided. LCM's omega is w - 1
(its eq. 7 writes (1 + omega) cond - omega uncond); REFERENCES D's pitfall.
"""
from __future__ import annotations

import torch

from difftrain.config import ConfigError
from difftrain.diffusion.keyed import keyed_rand
from difftrain.train.stages.base import FROZEN, TRAINABLE, ModuleSpec
from difftrain.train.stages.pretrain import PretrainStage


def teacher_guidance(teacher: str, default: float) -> float:
    """The CFG scale the teacher itself samples with (its checkpoint's saved sampling, e.g. 1.0 for a student that
    has CFG distilled in), so an unguided round samples as its teacher does; ``default`` when it cannot be read."""
    from difftrain.train.sources import Source

    try:
        return Source.parse("stage_args.teacher", teacher).sampling(default).guidance
    except (ConfigError, OSError, ValueError):
        return default


class TeacherStage(PretrainStage):
    """A student (``student``, trainable, initialised from the teacher unless ``init_from`` says) and a frozen
    ``teacher``; ``args`` has ``teacher`` (may be empty where the stage allows it), ``teacher_guidance`` and
    ``guidance_range``."""
    served = trained = "student"

    def __init__(self, shared, args):
        super().__init__(shared)
        from difftrain.diffusion.diffusion import build_diffusion
        from difftrain.train.sources import Source

        self.args = args
        self.source = Source.parse("stage_args.teacher", args.teacher) if args.teacher else None
        tcfg = self.source.config() if self.source is not None else None
        self.teacher_diffusion = (build_diffusion(tcfg.diffusion, pixel_space=not shared.cfg.encoders.vae)
                                  if tcfg is not None else self.diffusion)
        if self.teacher_diffusion.path.name != self.diffusion.path.name:
            raise ConfigError(f"config key 'diffusion.path' = '{self.diffusion.path.name}', but the teacher "
                              f"'{args.teacher}' was trained on '{self.teacher_diffusion.path.name}': the student "
                              "must take its steps on the teacher's path")

    @classmethod
    def check_guidance(cls, cfg, args) -> None:
        r = args.guidance_range
        if not r:
            return
        if (len(r) != 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in r)
                or r[0] > r[1]):
            raise ConfigError(f"config key 'stage_args.guidance_range' = {r}: two numbers [w_min, w_max], "
                              "w_min <= w_max")
        if not cfg.model.args.get("guidance_embed") or cfg.model.cond == "none":
            raise ConfigError("config key 'stage_args.guidance_range' needs a conditional student that takes the "
                              "guidance scale as an input: set model.args.guidance_embed=true")

    @classmethod
    def roles(cls, cfg) -> dict[str, tuple[str, str]]:
        out = {"student": (TRAINABLE, "init_from")}
        if cls.parse_args(cfg).teacher:
            out["teacher"] = (FROZEN, "stage_args.teacher")
        return out

    @classmethod
    def sources(cls, cfg) -> dict[str, str]:
        teacher = cls.parse_args(cfg).teacher
        return {"stage_args.teacher": teacher} if teacher else {}

    @classmethod
    def guidance(cls, cfg, args) -> float:
        """The student's sampling guidance: the run's scale as its input (guidance_range), none when one scale is
        distilled in, else the teacher's own (the run's without a teacher)."""
        if getattr(args, "guidance_range", None):
            return cfg.run.sample_guidance
        if args.teacher_guidance != 1.0:
            return 1.0
        return teacher_guidance(args.teacher, cfg.run.sample_guidance) if args.teacher else cfg.run.sample_guidance

    def modules(self) -> dict[str, ModuleSpec]:
        from difftrain.models import registry
        from difftrain.train.sources import Source, parse_optional

        if self.source is None:  # no teacher: the student starts as pre-training would (init_from or seeded)
            return {"student": self.shared.backbone_spec(parse_optional("init_from", self.shared.cfg.init_from))}
        init = Source.parse("init_from", self.shared.cfg.init_from) if self.shared.cfg.init_from else self.source
        found = self.source.model_config()
        arch, acfg = found if found is not None else (self.shared.arch, self.shared.acfg)

        def teacher(device: torch.device):
            model = registry.materialize(registry.build(arch, acfg), device, seed=0)
            self.source.load(model)
            return model

        return {"student": self.shared.backbone_spec(init),  # initialised from the teacher unless init_from says
                "teacher": ModuleSpec(FROZEN, meta=lambda: registry.build(arch, acfg), init=teacher,
                                      source=self.source)}

    def guided(self, batch: dict, step: int, x0: torch.Tensor):
        """(cond, w, uncond) for the teacher's denoiser: w per sample (keyed) and in the student's cond with
        ``guidance_range``, the fixed ``teacher_guidance`` otherwise; uncond only where CFG applies."""
        cond, w = batch["cond"], self.args.teacher_guidance
        if getattr(self.args, "guidance_range", None) and cond:
            lo, hi = self.args.guidance_range
            w = (lo + (hi - lo) * keyed_rand(self.seed, step, batch["index"], "guidance", torch.float64)).to(x0)
            cond = {**cond, "guidance": w}
        uncond = self.conditioner.null(x0.shape[0]) if cond and (torch.is_tensor(w) or w != 1.0) else {}
        return cond, (w if cond else 1.0), uncond

    def teacher_x0(self, cond: dict, w, uncond: dict, dtype: torch.dtype):
        """``fn(x, t) -> x0^`` of the guided teacher, run in the data's ``dtype`` and returned in float64."""
        from difftrain.diffusion.guidance import guided_denoiser

        fn = guided_denoiser(self.live["teacher"], cond, uncond, w, to_x0=self.teacher_diffusion.sample_x0)
        return lambda x, t: fn(x.to(dtype), t.to(dtype)).double()
