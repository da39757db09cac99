"""Model changes (config key ``adapt``): an ordered list of changes applied to a stage's trained modules before the
engine wraps them, composable with any stage (docs/ARCHITECTURE.md, "Stages own their modules", item 2; the shape
of torchtitan's ``ModelConverter``).

    adapt:
      - {kind: lora, rank: 16, targets: [attn, mlp]}

Each entry names its ``kind`` (a key of :data:`CHANGES`) and its settings, checked by the change's dataclass
(``ConfigError`` naming ``adapt[i].KEY``). A change edits a module in place (``finetune/change.py``, :meth:`Change.apply`: adds its own
parameters and freezes what it does not train), folds itself back into the plain architecture for serving
(:meth:`Change.merge`), and names the parameters it owns (:meth:`Change.owns`).

The trainer applies the changes to every trainable module a stage declares and to the derived modules copied from
them (a consistency target network of a LoRA student is a LoRA'd copy), never to frozen ones (a teacher), with
the run seed (so every rank draws the same initial adapter weights). A changed module is materialised whole and
then sharded (FSDP2's meta -> sharded load path is for unchanged modules). When the base comes from a source
(``init_from``, a stage's teacher), checkpoints hold only what the changes train (the adapters, their optimizer
state and EMA) and record the base by fingerprint (``Trainer.base_sources``); a resume and a read for serving
rebuild the base from it and refuse another one. Serving a run (``sample``, ``eval``,
``export``, a later stage's ``init_from``) applies the run's changes to the plain architecture, loads the
checkpoint and merges: the served model is the plain architecture with merged weights (and the modules of a change
that does not merge: a ControlNet branch, a T2I-Adapter).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from difftrain.config import ConfigError, parse_fields
from difftrain.finetune.change import Change
from difftrain.finetune.controlnet import ControlNet
from difftrain.finetune.difffit import DiffFit
from difftrain.finetune.lora import LoRA
from difftrain.finetune.t2i_adapter import T2IAdapter
from difftrain.quant.qat import QAT

KINDS = {c.kind: c for c in (LoRA, DiffFit, ControlNet, T2IAdapter, QAT)}  # the model changes by config name


def changes_of(cfg) -> list[Change]:
    """``cfg.adapt`` as changes, checked (one-line ``ConfigError`` naming ``adapt[i].KEY``)."""
    kinds = KINDS
    out = []
    for i, entry in enumerate(cfg.adapt):
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ConfigError(f"config key 'adapt[{i}]' must be a mapping with a 'kind' ({', '.join(kinds)}), "
                              f"got {entry!r}")
        kind = entry["kind"]
        if kind not in kinds:
            raise ConfigError(f"config key 'adapt[{i}].kind' = {kind!r} is not one of: {', '.join(kinds)}")
        cls = kinds[kind]
        args = parse_fields(f"adapt[{i}]", cls.args_class, {k: v for k, v in entry.items() if k != "kind"},
                            f"model change '{kind}'")
        change = cls(args, i)
        change.context(cfg)
        out.append(change)
    return out


def apply_changes(model: nn.Module, changes: list[Change], seed: int) -> nn.Module:
    """``model`` with ``changes`` applied in order; new parameters drawn from ``seed`` (the same on every rank)."""
    if changes:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for c in changes:
                c.apply(model)
    return model


def merge_changes(model: nn.Module, changes: list[Change]) -> nn.Module:
    """The plain architecture with every change folded into its weights (the reverse order of applying)."""
    for c in reversed(changes):
        c.merge(model)
    return model


def adapted_specs(specs: dict, changes: list[Change], seed: int) -> dict:
    """A stage's declared modules (``Stage.modules``) with the changes applied to the trainable ones and to the
    derived copies of them; frozen modules as they are."""
    from difftrain.train.stages.base import DERIVED, TRAINABLE

    if not changes:
        return specs
    out = {}
    for name, spec in specs.items():
        if spec.role == TRAINABLE or (spec.role == DERIVED and specs[spec.of].role == TRAINABLE):
            init = spec.init

            def meta(spec=spec):
                return apply_changes(spec.meta(), changes, seed)

            def make(device, init=init):
                return apply_changes(init(device), changes, seed)

            trainable = spec.role == TRAINABLE
            spec = dataclasses.replace(spec, meta=meta, init=make if init is not None else None,
                                       source=None if trainable else spec.source,
                                       base=spec.source if trainable else None)
        out[name] = spec
    return out
