"""A target network's forward carried through the pipeline's segments, as extra rows of every micro-batch.

Consistency distillation's loss compares the student's f(x_{n+1}, t_{n+1}) with a target network's f(x_n, t_n):
the target is the student's own weights without gradient, or an EMA copy of them (a derived module). Its output
depends on the live weights, so it cannot be prefetched as frozen work, and under a pipeline those weights are
cut into segments on different ranks. So the target rides along: the stage's ``model_inputs`` stacks the
student's rows and the target's rows (``[x_{n+1}; x_n]``, ``[t_{n+1}; t_n]``, the condition twice), and every
segment (:class:`Carry`) runs the first half through the trained segment with gradient and the second half
through the target's segment without, passing both halves on in one wire tensor. The last segment's output is
``[student prediction; target prediction]``, which the stage's ``loss`` splits (the plain loop's ``forward``
returns the same stack). The target rows get no gradient (their inputs' gradient rows are zero), so the
backward is the student's alone.

With FSDP2, torch's ``PipelineStage`` drives the FSDP module's gradient sync only when the stage's module *is*
the FSDP module; :class:`CarryStage` points those calls (``backward_maybe_with_nosync``, ``perform_reduce_grad``:
private pipelining API, like ``fill.py``'s, gated by the same equality tests) at the trained segment.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

CARRY_MODES = ("self", "copy")


class Carry(nn.Module):
    """A segment whose inputs hold the student's rows then the target's rows (batch-first, equal halves)."""

    def __init__(self, student: nn.Module, target: nn.Module | None):
        super().__init__()
        self.student = student
        self.target = target  # None: the student's own segment, without gradient

    def forward(self, *wire: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        b = wire[0].shape[0] // 2
        if any(w.shape[0] != 2 * b for w in wire):
            raise RuntimeError(f"a carried target needs every wire tensor batch-first with 2 x {b} rows, got "
                               f"{[tuple(w.shape) for w in wire]}")
        out = self.student(*(w[:b] for w in wire))
        with torch.no_grad():
            tgt = (self.target or self.student)(*(w[b:] for w in wire))
        if isinstance(out, torch.Tensor):
            return torch.cat([out, tgt])
        return tuple(torch.cat([o, t]) for o, t in zip(out, tgt))


class CarryStage(PipelineStage):
    """``PipelineStage`` over a :class:`Carry` whose data-parallel hooks act on the trained segment."""

    def _on_student(self, fn: Callable, *args, **kwargs):
        carry, self.submod = self.submod, self.submod.student
        try:
            return fn(*args, **kwargs)
        finally:
            self.submod = carry

    def backward_maybe_with_nosync(self, *args, **kwargs):
        return self._on_student(super().backward_maybe_with_nosync, *args, **kwargs)

    def perform_reduce_grad(self, *args, **kwargs):
        return self._on_student(super().perform_reduce_grad, *args, **kwargs)


def carry_stages(modules: list[nn.Module], ids: list[int], n_segments: int, device: torch.device, pp_group,
                 wrap: Callable[[nn.Module], nn.Module], mode: str):
    """The stages of this rank's segments with a carried target (``mode``: ``"self"`` or ``"copy"``), and the
    target's segment modules for ``"copy"`` (copies of the initialised segments, no grad, wrapped like them; an
    FSDP2 root that never runs a backward reshards after its forward)."""
    if mode not in CARRY_MODES:
        raise ValueError(f"carry must be one of {', '.join(CARRY_MODES)}, got {mode!r}")
    stages, targets = [], []
    for mod, sid in zip(modules, ids):
        target = None
        if mode == "copy":
            target = copy.deepcopy(mod).requires_grad_(False)
            targets.append(target)
            target = wrap(target)
            if hasattr(target, "set_reshard_after_forward"):
                target.set_reshard_after_forward(True)
        stages.append(CarryStage(Carry(wrap(mod), target), sid, n_segments, device, group=pp_group))
    return stages, (targets if mode == "copy" else None)
