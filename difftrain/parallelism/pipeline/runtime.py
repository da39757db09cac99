"""Run a backbone's pipeline segments with ``torch.distributed.pipelining`` (public API only).

``build_pipeline(model, bounds, schedule, n_microbatches, loss_fn, pp_group, device)`` cuts ``model`` into the
segments this pp rank owns (``segments.make_segment``), wraps each in a ``PipelineStage`` and returns a
:class:`Pipeline` whose ``step`` runs one training iteration of the chosen schedule:

* ``gpipe`` (Huang et al. 2019) and ``1f1b`` (Narayanan et al. 2021, PipeDream-Flush): one segment per rank;
* ``interleaved_1f1b`` (Narayanan et al. 2021, sec. 2.2) : ``v`` segments per rank, round-robin (rank r owns
  segments r, r + pp, ...);
* ``zero_bubble`` (Qi et al. 2024, ZB-V): two segments per rank in a V (rank r owns r and 2·pp − 1 − r), backward
  split into input- and weight-gradient passes.

Micro-batches are split by the caller (``Pipeline.step(inputs, targets)`` takes lists): every pp rank of a
data-parallel slice reads the same batch and draws the same keyed noise, so only the first segment's inputs and
the last segment's targets matter on a rank and nothing else is sent. The loss of a micro-batch is its mean; the
schedule averages gradients over micro-batches (``scale_grads``), so equal micro-batches give the full batch's
mean-loss gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from difftrain.parallelism.pipeline.segments import make_segment, num_blocks

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


def segment_ids(schedule: str, pp_rank: int, pp: int, n_segments: int) -> list[int]:
    """The segment indices a pp rank owns, in the order the schedule expects them."""
    if schedule in ("gpipe", "1f1b"):
        if n_segments != pp:
            raise ValueError(f"schedule {schedule!r} runs one segment per rank: {n_segments} segments on {pp} ranks")
        return [pp_rank]
    if schedule == "interleaved_1f1b":
        if n_segments % pp or n_segments < 2 * pp:
            raise ValueError(f"schedule 'interleaved_1f1b' needs a multiple (>= 2) of {pp} segments, "
                             f"got {n_segments}")
        return list(range(pp_rank, n_segments, pp))
    if schedule == "zero_bubble":
        if n_segments != 2 * pp:
            raise ValueError(f"schedule 'zero_bubble' (ZB-V) runs two segments per rank: {2 * pp} segments, "
                             f"got {n_segments}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"unknown pipeline schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def _schedule_class(schedule: str):
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                              ScheduleZBVZeroBubble)

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
            "zero_bubble": ScheduleZBVZeroBubble}[schedule]


@dataclass
class Pipeline:
    modules: list[nn.Module]  # this rank's segment modules (parameter names are the whole model's)
    ids: list[int]  # their segment indices
    n_segments: int
    schedule: object
    n_microbatches: int
    targets: list[nn.Module] | None = None  # carry="copy": the target network's segments (no grad), as modules

    def target_union(self) -> nn.Module | None:
        """This rank's target-network segments under the whole model's names (carry="copy"), else None."""
        if not self.targets:
            return None
        return self.targets[0] if len(self.targets) == 1 else _Union(self.targets)

    @property
    def has_first(self) -> bool:
        return 0 in self.ids

    @property
    def has_last(self) -> bool:
        return self.n_segments - 1 in self.ids

    def named_parameters(self):
        for m in self.modules:
            yield from m.named_parameters()

    def union(self) -> nn.Module:
        """One module holding this rank's segments under the whole model's names (what the optimizer, the EMA and
        checkpoints see): the segment itself, or for several segments per rank their children merged."""
        if len(self.modules) == 1:
            return self.modules[0]
        return _Union(self.modules)


    def step(self, inputs: list[tuple] | None, targets: list | None, slots: dict | None = None,
             input_fn=None, target_fn=None) -> list[torch.Tensor]:
        """One iteration over ``n_microbatches`` micro-batches: ``inputs[i]`` = the first segment's positional
        tensors of micro-batch i (ignored unless this rank owns segment 0), ``targets[i]`` = what ``loss_fn`` gets
        as its second argument (ignored unless this rank owns the last segment). Gradients accumulate into this
        rank's segment parameters. Returns the micro-batches' losses on the last segment's rank, else [].

        With a fill schedule (``build_pipeline(..., fill=True)``): ``slots`` = frozen work per slot
        (``fill.FrozenFill.slots``), ``input_fn`` / ``target_fn`` = the first segment's inputs / the last segment's
        targets computed on demand (frozen work inline or delivered mid-step, instead of ``inputs`` / ``targets``)."""
        if slots is not None or input_fn is not None or target_fn is not None:
            if not hasattr(self.schedule, "slots"):
                raise ValueError("frozen-work slots need build_pipeline(..., fill=True) (gpipe or 1f1b)")
        if hasattr(self.schedule, "slots"):
            self.schedule.slots, self.schedule.input_fn, self.schedule.target_fn = slots or {}, input_fn, target_fn
        losses: list[torch.Tensor] = []
        kw = dict(return_outputs=False)
        if self.has_first and input_fn is None:
            kw["arg_mbs"] = [tuple(x) for x in inputs]
            kw["kwarg_mbs"] = [{} for _ in inputs]
        if self.has_last:
            kw.update(target_mbs=[None] * self.n_microbatches if target_fn else list(targets), losses=losses)
        self.schedule.step(**kw)
        return losses


class _Union(nn.Module):
    def __init__(self, segments: list[nn.Module]):
        super().__init__()
        for name in segments[0]._modules:
            kids = [seg._modules.get(name) for seg in segments]
            present = [k for k in kids if k is not None]
            if not present:
                setattr(self, name, None)
            elif len(present) == 1:
                setattr(self, name, present[0])
            elif all(isinstance(k, nn.ModuleList) for k in present) and len({len(k) for k in present}) == 1:
                merged = nn.ModuleList([None] * len(present[0]))
                for k in present:
                    for i, b in enumerate(k):
                        if b is not None:
                            merged[i] = b
                setattr(self, name, merged)
            else:
                raise ValueError(f"segments on one rank share module {name!r}: this model takes one segment per "
                                 "rank (gpipe or 1f1b)")


def build_pipeline(model: nn.Module, bounds: list[tuple[int, int]], schedule: str, n_microbatches: int,
                   loss_fn: Callable, pp_group, device: torch.device, fill: bool = False,
                   wrap: Callable[[nn.Module], nn.Module] | None = None,
                   init: Callable[[list[nn.Module]], None] | None = None, carry: str | None = None) -> Pipeline:
    """Cut ``model`` (whole: materialised, or on the meta device) at ``bounds`` (one ``(lo, hi)`` block range per
    segment, covering the trunk) and keep the segments this rank owns in ``pp_group``. Segments cut from a meta model
    are allocated empty on ``device`` and filled by ``init(modules)`` (so no rank holds the whole model).
    ``fill``: run GPipe / 1F1B with ``fill.FillSchedule`` (frozen work in the bubbles; the only private-API
    path). ``wrap``: data parallelism for each segment module (DDP / FSDP2 on the dp mesh); ``PipelineStage`` skips
    its gradient sync until the last backward of the step. ``carry``: every micro-batch's second half of rows is a
    target network's no-grad forward carried through the segments (``carry.Carry``): ``"self"`` runs those rows
    through the trained segments, ``"copy"`` through a copy of them (``Pipeline.targets``, a derived module made
    from the initial weights, sharded like them); gpipe / 1f1b only."""
    if fill and schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"bubble filling covers gpipe and 1f1b; schedule {schedule!r} takes frozen work computed "
                         "up front (balanced) instead")
    import copy

    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    n = num_blocks(model)
    if bounds[0][0] != 0 or bounds[-1][1] != n or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"pipeline bounds {bounds} must cover blocks 0..{n} contiguously")
    pp, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    ids = segment_ids(schedule, rank, pp, len(bounds))
    modules = []
    for i, sid in enumerate(ids):
        # the last segment owned keeps the original object; others cut a copy (the model is modified in place)
        owner = model if i == len(ids) - 1 else copy.deepcopy(model)
        mod = make_segment(owner, *bounds[sid])
        on_meta = any(t.is_meta for t in (*mod.parameters(), *mod.buffers()))
        modules.append(mod.to_empty(device=device) if on_meta else mod.to(device))
    if init is not None:
        init(modules)
    wrap = wrap or (lambda m: m)
    targets = None
    if carry is not None:
        from difftrain.parallelism.pipeline.carry import carry_stages

        if schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"a carried target network runs with one segment per rank (gpipe, 1f1b), not "
                             f"{schedule!r}")
        stages, targets = carry_stages(modules, ids, len(bounds), device, pp_group, wrap, carry)
    else:
        stages = [PipelineStage(wrap(mod), sid, len(bounds), device, group=pp_group)
                  for mod, sid in zip(modules, ids)]  # torch's runners of the segments
    cls = _schedule_class(schedule)
    if fill:
        from difftrain.parallelism.pipeline.fill import FillSchedule

        sched = FillSchedule(stages[0], n_microbatches, loss_fn=loss_fn, schedule=schedule)
        return Pipeline(modules, ids, len(bounds), sched, n_microbatches, targets)
    sched = (cls(stages[0], n_microbatches, loss_fn=loss_fn) if schedule in ("gpipe", "1f1b")
             else cls(stages, n_microbatches, loss_fn=loss_fn))
    return Pipeline(modules, ids, len(bounds), sched, n_microbatches, targets)
