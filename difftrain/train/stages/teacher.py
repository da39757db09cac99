"""What the teacher-based stages share (progressive distillation, consistency distillation): the frozen teacher read
from a :class:`~difftrain.train.sources.Source` (``stage_args.teacher``), its path checked against the student's, its
CFG scale (one fixed ``teacher_guidance``, or w per sample from ``guidance_range`` as the student's input: Meng et
al. 2023's guided distillation, LCM's w-embedding), and how the student then samples with guidance.

**The teacher's work is frozen work** (``teacher_work``, no grad): a step that reads only the batch's latents and
caption states, the keyed noise, t and w, never the live weights, so it belongs to ``frozen`` (the plain loop runs
it there, after the encoders) and, pipelined, to the frozen pieces a pipeline places in its bubbles, prefetched a
step ahead (``frozen_pieces``: the piece ``teacher`` needs ``latents`` and ``text``). Which steps qualify:
progressive distillation's two DDIM steps and consistency distillation's ODE step do; a consistency target
network's f(x_n, t_n) and DMD's real and fake scores (on the live generator's output) do not.

The scale convention is ours throughout: x^ = uncond + w (cond - uncond), w = 1 unguided. LCM's omega is w - 1
(its eq. 7 writes (1 + omega) cond - omega uncond); REFERENCES D's pitfall.
"""
from __future__ import annotations

import torch

from difftrain.config import ConfigError
from difftrain.diffusion.keyed import keyed_rand
from difftrain.train.stages.base import FROZEN, TRAINABLE, FrozenPiece, ModuleSpec
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
    teacher_keys: tuple[str, ...] = ()  # the batch-first tensors ``teacher_work`` adds to the frozen batch

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

    @classmethod
    def teacher_forwards(cls, cfg) -> int:
        """Teacher forwards per training sample (``difftrain plan`` costs the teacher's frozen work with it): the
        stage's ODE evaluations, twice where CFG runs the unconditional branch too."""
        args = cls.parse_args(cfg)
        cfg_branches = 2 if cfg.model.cond != "none" and (args.guidance_range or args.teacher_guidance != 1.0) else 1
        return cls.teacher_evaluations(args) * cfg_branches

    @classmethod
    def teacher_evaluations(cls, args) -> int:
        """The teacher's ODE evaluations per sample and step."""
        return 1

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

    @property
    def prefetches(self) -> bool:
        """Whether the stage has teacher work that is frozen work (a teacher and ``teacher_keys``; DMD's scores of
        the live generator's output are not)."""
        return self.source is not None and bool(self.teacher_keys)

    def teacher_work(self, batch: dict, step: int) -> dict:
        """The teacher's no-grad work for ``batch`` (with ``x0`` and ``cond``): the ``teacher_keys`` tensors."""
        raise NotImplementedError

    def teacher_outputs(self, batch: dict, step: int) -> dict:
        """``teacher_work``'s tensors: the frozen batch's (computed in ``frozen``, or by a pipeline's frozen
        pieces), computed here for a batch that lacks them."""
        if all(k in batch for k in self.teacher_keys):
            return {k: batch[k] for k in self.teacher_keys}
        with torch.no_grad():
            return self.teacher_work(batch, step)

    @torch.no_grad()
    def frozen(self, batch: dict, step: int) -> dict:
        out = super().frozen(batch, step)
        return {**out, **self.teacher_work(out, step)} if self.prefetches else out

    def frozen_pieces(self, step: int) -> list[FrozenPiece]:
        pieces = super().frozen_pieces(step)
        if not self.prefetches:
            return pieces
        return [*pieces, FrozenPiece("teacher", lambda b: self.teacher_work(b, step), self.live.get("teacher"),
                                     self.teacher_keys, needs=tuple(p.name for p in pieces))]
