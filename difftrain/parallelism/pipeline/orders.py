"""The per-rank action orders of the pipeline schedules: what the simulator times and the fill runtime runs.

``rank_order``: ours for GPipe and 1F1B (one segment per rank; ``fill.FillSchedule`` executes it);
``torch_orders``: torch's own orders for interleaved 1F1B and ZB-V (two segments per rank), read from the
schedules' private order builders (tested on the torch ``fill.TESTED_TORCH``).
"""
from __future__ import annotations

SIM_SCHEDULES = ("gpipe", "1f1b")


def rank_order(schedule: str, rank: int, n_segments: int, n_mb: int) -> list[tuple[str, int]]:
    """The (``"F"`` | ``"B"``, micro-batch) actions of pp rank ``rank`` in execution order.

    GPipe: all forwards, then all backwards. 1F1B (PipeDream-Flush, Narayanan et al. 2021, fig. 4): ``S - 1 - r``
    warm-up forwards, then one forward / one backward pairs, then the remaining backwards."""
    if schedule == "gpipe":
        return [("F", i) for i in range(n_mb)] + [("B", i) for i in range(n_mb)]
    if schedule == "1f1b":
        warm = min(n_segments - 1 - rank, n_mb)
        order = [("F", i) for i in range(warm)]
        for i in range(n_mb - warm):
            order += [("F", warm + i), ("B", i)]
        return order + [("B", i) for i in range(n_mb - warm, n_mb)]
    raise ValueError(f"the simulator and the fill runtime cover {', '.join(SIM_SCHEDULES)}; got {schedule!r}")


def schedule_orders(schedule: str, n_ranks: int, n_mb: int) -> list[list[tuple[str, int, int]]]:
    """Per rank, its ``(kind, micro-batch, segment)`` actions: ours for GPipe / 1F1B (one segment per rank), torch's
    own orders for interleaved 1F1B and ZB-V (:func:`torch_orders`)."""
    if schedule in SIM_SCHEDULES:
        return [[(k, i, r) for k, i in rank_order(schedule, r, n_ranks, n_mb)] for r in range(n_ranks)]
    return torch_orders(schedule, n_ranks, n_mb)


def torch_orders(schedule: str, pp: int, n_mb: int) -> list[list[tuple[str, int, int]]]:
    """Per pp rank, the ``(kind, micro-batch, segment)`` actions torch's own multi-segment schedule runs
    (``interleaved_1f1b``: 2 segments per rank; ``zero_bubble``: ZB-V), kinds F, B (full backward), I (input
    gradient), W (weight gradient): the simulator's source of truth for these schedules. Private API: the
    schedules' per-rank order builders, called without building any ``PipelineStage``."""
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import (ScheduleInterleaved1F1B, ScheduleZBVZeroBubble,
                                                        _ComputationType)

    if schedule == "interleaved_1f1b":
        rounds = max(1, n_mb // pp)
        if n_mb % rounds:
            raise ValueError(f"interleaved 1F1B needs micro-batches ({n_mb}) divisible by the rounds ({rounds})")
        fake = SimpleNamespace(n_local_stages=2, microbatches_per_round=n_mb // rounds, pp_group_size=pp,
                               _n_microbatches=n_mb, number_of_rounds=rounds)
        calc = ScheduleInterleaved1F1B._calculate_single_rank_operations
    elif schedule == "zero_bubble":
        fake = SimpleNamespace(pp_group_size=pp, _n_microbatches=n_mb, num_stages=2 * pp)
        calc = ScheduleZBVZeroBubble._calculate_single_rank_operations
    else:
        raise ValueError(f"torch_orders covers interleaved_1f1b and zero_bubble, not {schedule!r}")
    kinds = {_ComputationType.FORWARD: "F", _ComputationType.FULL_BACKWARD: "B",
             _ComputationType.BACKWARD_INPUT: "I", _ComputationType.BACKWARD_WEIGHT: "W"}
    return [[(kinds[a.computation_type], a.microbatch_index, a.stage_index) for a in calc(fake, r)
             if a is not None and a.computation_type in kinds] for r in range(pp)]
