"""Stage registry: config ``stage`` -> Stage class (all run on the same Trainer), and ``stage_args`` checking."""
from __future__ import annotations

from difftrain.train.stages.base import Stage
from difftrain.train.stages.consistency import ConsistencyStage
from difftrain.train.stages.dmd import DMDStage
from difftrain.train.stages.pretrain import PretrainStage
from difftrain.train.stages.progressive import ProgressiveStage
from difftrain.train.stages.reflow import ReflowStage
from difftrain.train.stages.trajectory import TrajectoryStage

STAGES: dict[str, type[Stage]] = {s.name: s for s in (PretrainStage, ReflowStage, ProgressiveStage,
                                                             ConsistencyStage, DMDStage, TrajectoryStage)}


def stage_args(cfg):
    """``cfg.stage_args`` as the stage's own dataclass (``ConfigError`` naming ``stage_args.KEY``)."""
    return STAGES[cfg.stage].parse_args(cfg)
