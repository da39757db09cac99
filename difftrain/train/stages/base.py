"""Stage: the unit of pluggability. A stage is the training objective (pretrain, reflow, progressive, ...); one
Trainer, engine and checkpoint format runs every stage (docs/ARCHITECTURE.md, "Stages own their modules").

**Build order.** The trainer builds the shared parts (:class:`~difftrain.train.build.Shared`: device, meshes,
frozen encoders, diffusion, conditioner, the run's architecture), then the stage, which *declares* its modules
and their roles (:meth:`Stage.modules`); the engine then materialises and wraps what is trainable, loads what is
frozen, checkpoints both (a frozen module by its source's path and fingerprint, not its weights) and hands the
live modules back (:meth:`Stage.bind`).

**Roles.** ``trainable``: gradients, a share of the optimizer, an EMA (the served module's EMA is what sampling
and export use). ``frozen``: no grad, no optimizer state, loaded once from a :class:`~difftrain.train.sources.
Source` (a teacher). ``derived``: a copy of a trainable module with its own update rule (``after_step``: a target
network). A stage's own non-tensor state (``state_dict``) goes into every checkpoint's train state. Model changes (LoRA, ControlNet, fake quantisation: later issues) will apply to the declared
modules before the engine wraps them.

**Step contract**, shared by the plain and the pipelined loop (train/pipeline.py) so both run the same methods:

    frozen(batch)          no-grad work that reads no live weights: VAE latents ``x0``, the ``cond`` dict, and a
                           teacher's steps on them (``frozen_pieces``: the same work by module, for a pipeline's
                           bubbles; a teacher piece ``needs`` the encoders' pieces)
    prepare(batch)         draw t and noise (keyed by seed, step, sample index), teacher work, targets, weights
    model_inputs(prep)     (x_t, t, cond) for the trained module (the pipeline feeds these to its first segment)
    loss(pred, prep)       per-sample loss and its scalar mean, reading only the ``loss_keys`` tensors of prep
                           (the pipeline carries exactly those to its last segment)

A stage whose step cannot run through a pipeline (several trainable modules, teacher work that needs the whole
teacher where the pipeline's first segment is) sets ``pipeline_refusal`` to say why; the config check refuses
``parallel.pp > 1`` for it in one line.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

TRAINABLE, FROZEN, DERIVED = "trainable", "frozen", "derived"
ROLES = (TRAINABLE, FROZEN, DERIVED)


@dataclass
class ModuleSpec:
    """A module a stage declares. ``meta()``: its architecture on the meta device (parameter counts, the pipeline's
    cut, dry runs). ``init(device)``: a materialised module with its initial weights (trainable: the seeded
    init or ``init_from``). ``source``: where a frozen module's weights are read (recorded in checkpoints by path
    and fingerprint). ``of``: a derived module's trainable original: it starts as a copy of it (sharded like it),
    has no grad and no optimizer state, is checkpointed (``derived.NAME.*``) and moves only by the stage's
    ``after_step`` (a target network: an EMA of the student with its own decay schedule). ``base``: where a trainable
    module under model changes read its frozen base (its ``source`` before the changes; its checkpoints leave the
    base out and record it by fingerprint)."""
    role: str
    meta: Callable[[], nn.Module]
    init: Callable[[torch.device], nn.Module] | None = None
    source: object | None = None  # difftrain.train.sources.Source
    of: str | None = None  # derived: the trainable module it copies
    base: object | None = None  # a trainable module under model changes (adapt): the Source of its frozen base

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"module role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if (self.role == DERIVED) != (self.of is not None):
            raise ValueError("a derived module names the trainable module it copies (of=...), and only it does")


@dataclass
class FrozenPiece:
    """Part of a stage's ``frozen`` work done by one frozen module, for a pipeline to place (and hold) apart from
    the rest: ``fn(batch)`` returns the ``provides`` keys of ``frozen``'s output (``"x0"``: a tensor, ``"cond"``: the
    cond dict, any other key: a batch-first tensor); ``module`` holds its weights (None: no weights worth placing
    apart). ``needs``: the pieces whose outputs ``fn`` reads (merged into its batch): a teacher's step reads the
    latents and the caption states, so a pipeline runs it after them on the same samples and rank."""
    name: str
    fn: Callable[[dict], dict]
    module: nn.Module | None
    provides: tuple[str, ...]
    needs: tuple[str, ...] = ()


@dataclass
class SamplingDefaults:
    """How a stage's served model samples (``difftrain sample``/``eval``/``export``, sample grids, validation)."""
    sampler: str
    steps: int
    guidance: float


class Stage(ABC):
    name: str = ""
    args_class: type | None = None  # the dataclass that checks config key ``stage_args``
    served: str = "backbone"  # the trainable module that sampling and export use (its EMA)
    trained: str = "backbone"  # the trainable module ``model_inputs`` feeds (a pipeline cuts this one)
    loss_keys: tuple[str, ...] = ("x0", "eps", "t", "weight")
    pipeline_refusal: str | None = None  # why this stage cannot run with parallel.pp > 1 (None: it can)

    def __init__(self, shared):
        self.shared = shared
        self.live: dict[str, nn.Module] = {}

    @abstractmethod
    def modules(self) -> dict[str, ModuleSpec]:
        """Every module the stage trains or reads, by name (stable: checkpoint keys)."""

    def bind(self, live: dict[str, nn.Module]) -> None:
        """The engine's live modules by name: trainable ones wrapped for forward (DDP/FSDP2), frozen ones loaded,
        derived ones as copies of their originals."""
        self.live = live

    def after_step(self, step: int, ok: torch.Tensor) -> None:
        """After each optimizer step (``ok``: whether it was applied, a 0-dim device tensor; no host sync): move
        derived modules (a target network's update). Default: nothing."""

    def state_dict(self) -> dict:
        """The stage's own non-tensor state (JSON), saved in every checkpoint's train state and restored on resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a checkpoint from before the stage had state gives ``{}``)."""

    @classmethod
    def parse_args(cls, cfg):
        """``cfg.stage_args`` as ``args_class`` (types, choices, bounds, required keys), or None for a stage without
        arguments. ``ConfigError`` naming ``stage_args.KEY``."""
        from difftrain.config import ConfigError, parse_fields

        if cls.args_class is None:
            if cfg.stage_args:
                raise ConfigError(f"config key 'stage_args' must be empty: stage '{cfg.stage}' takes no arguments")
            return None
        return parse_fields("stage_args", cls.args_class, cfg.stage_args, f"stage '{cfg.stage}'")

    @classmethod
    def sampling(cls, cfg) -> SamplingDefaults:
        """The served model's sampler, steps and guidance: the run's ``run.sample_*`` unless the stage fixes them.
        May read the stage's sources (a teacher's own sampling); the trainer saves the result in every checkpoint's
        train state, which is what ``sample``/``eval``/``export`` then use."""
        return SamplingDefaults(cfg.run.sample_sampler, cfg.run.sample_steps, cfg.run.sample_guidance)

    @classmethod
    def check(cls, cfg) -> None:
        """Stage-specific config checks (one-line ``ConfigError``), run by ``config_checks.validate``."""

    @classmethod
    def roles(cls, cfg) -> dict[str, tuple[str, str]]:
        """Without reading a file: each module's (role, config key of its weights source; for a derived module the
        name of the trainable module it copies), in ``modules()`` order (dry runs plan a stage whose sources do not
        exist yet)."""
        return {cls.trained: (TRAINABLE, "init_from")}

    @classmethod
    def sources(cls, cfg) -> dict[str, str]:
        """The weight sources the stage reads besides ``init_from`` (config key -> text), checked at launch."""
        return {}

    @abstractmethod
    def frozen(self, batch: dict, step: int) -> dict: ...

    def frozen_pieces(self, step: int) -> list[FrozenPiece]:
        """``frozen`` split by module (DiffusionPipe places and partitions them apart). Default: one piece."""
        return [FrozenPiece("frozen", lambda b: self.frozen(b, step), None, ("x0", "cond"))]

    @classmethod
    def carried(cls, cfg) -> str | None:
        """The module whose no-grad forward the loss also needs, on the second half of ``model_inputs``' rows (a
        consistency target network: a derived copy of the trained module, or the trained module itself), so a
        pipeline carries those rows through its segments (``pipeline/carry.py``); ``forward`` returns the stack
        of both predictions. None: ``model_inputs`` is the trained module's alone."""
        return None

    @abstractmethod
    def prepare(self, batch: dict, step: int) -> dict: ...

    def model_inputs(self, prep: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return prep["x_t"], prep["t"], prep["cond"]

    def forward(self, prep: dict) -> torch.Tensor:
        x, t, cond = self.model_inputs(prep)
        return self.live[self.trained](x, t, cond)

    @abstractmethod
    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scalar loss to backpropagate, detached per-sample loss [B]); reads only ``loss_keys`` of prep."""
