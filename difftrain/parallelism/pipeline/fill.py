"""Bubble filling on ``torch.distributed.pipelining`` (DiffusionPipe, Tian et al. 2024, sec. 4.2).

:class:`FillSchedule` runs GPipe or 1F1B for one segment per rank in the order of ``orders.rank_order`` and, before
each action, runs the frozen work placed in that slot: it posts the action's receive (fused with the previous
action's pending sends, as torch's own 1F1B does, so NCCL cannot deadlock on crossing send/recv pairs), does the
frozen work while the message is in flight, then waits. The frozen work is the *next* iteration's (placed by
``simulate.fill_plan`` from profiled costs), so it never depends on this iteration's backbone; a module's
micro-batch may be split over several slots by sample ranges. :class:`FrozenFill` runs the pieces and delivers the
results to every pp rank (one all-reduce per output over zero-initialised buffers: exact), so the first segment has
its inputs and the last its targets at the next step. A step with nothing prefetched (the first, the first after a
resume) runs its *own* frozen work in its own bubbles (:class:`CurrentFill`, placed by ``simulate.current_plan``),
delivered mid-step to the first and last segments.

This module and ``orders.torch_orders`` are the only code of difftrain that touches private pipelining API
(``PipelineScheduleSingle``'s ``_check_inputs``, ``_initialize_stage``, ``_maybe_compute_loss``,
``_maybe_get_loss``, ``_update_losses``, ``_batch_p2p``, ``_wait_batch_p2p`` and the ``PipelineStage``'s
``get_*_ops`` / ``*_one_chunk``). It is written against torch ``TESTED_TORCH``; upgrades are gated by the
gradient-equality test (tests/distributed/test_pipeline_dist.py).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, _batch_p2p, _wait_batch_p2p

from difftrain.parallelism.pipeline.orders import rank_order
from difftrain.parallelism.pipeline.simulate import Chunk

TESTED_TORCH = "2.14"
if not torch.__version__.startswith(TESTED_TORCH):
    warnings.warn(f"difftrain's pipeline bubble filling uses private torch.distributed.pipelining API tested on torch "
                  f"{TESTED_TORCH}; this is torch {torch.__version__}: run tests/distributed/test_pipeline_dist.py")


class FillSchedule(PipelineScheduleSingle):
    """GPipe / 1F1B with frozen work in the slots. Per step, set ``slots`` (``{k: [(label, fn)]}``: run before
    action k of ``order``; ``k = len(order)`` after the last) and, for frozen work inline on the first segment,
    ``input_fn`` (micro-batch index -> the first segment's positional inputs, called right before its forward) and,
    for frozen work of this iteration delivered mid-step (:class:`CurrentFill`), ``target_fn`` (micro-batch index
    -> the last segment's target, called right before its forward).
    ``trace`` holds the last step's ``(kind, label, t0, t1)`` events (kinds F, B, frozen, wait; perf_counter).
    ``stage``: torch's ``PipelineStage`` running this rank's segment."""

    def __init__(self, stage, n_microbatches: int, loss_fn: Callable | None = None, schedule: str = "1f1b",
                 scale_grads: bool = True):
        super().__init__(stage, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        self.order = rank_order(schedule, stage.stage_index, stage.num_stages, n_microbatches)
        self.slots: dict[int, list[tuple[str, Callable]]] = {}
        self.input_fn: Callable[[int], tuple] | None = None
        self.target_fn: Callable[[int], object] | None = None
        self.trace: list[tuple[str, str, float, float]] = []

    def _frozen(self, k: int) -> None:
        for label, fn in self.slots.get(k, ()):
            t0 = time.perf_counter()
            fn()
            self.trace.append(("frozen", label, t0, time.perf_counter()))

    def _timed(self, label: str, fn: Callable, i: int):
        t0 = time.perf_counter()
        out = fn(i)
        self.trace.append(("frozen", label, t0, time.perf_counter()))
        return out

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, return_outputs=True,
                           loss_kwargs=None):
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        stage, n = self._stage, self._n_microbatches
        inline = self.input_fn is not None and stage.is_first
        lazy_targets = self.target_fn is not None and stage.is_last
        self.trace = []
        resolved: dict[int, tuple] = {}
        if not self._stage_forward_initialized:  # shape inference needs micro-batch 0 (first step only)
            if inline:
                resolved[0] = self._timed("inline0", self.input_fn, 0)
            if lazy_targets:
                target_mbs[0] = self._timed("target0", self.target_fn, 0)
        first_args = resolved.get(0, arg_mbs[0])
        self._initialize_stage(first_args, kwarg_mbs[0], target_mbs[0] if target_mbs is not None else None,
                               loss_kwargs)
        last_b = max(k for k, (kind, _) in enumerate(self.order) if kind == "B")
        pending: list = []
        in_flight: list = []
        for k, (kind, i) in enumerate(self.order):
            recv = stage.get_fwd_recv_ops(i) if kind == "F" else stage.get_bwd_recv_ops(i)
            works = _batch_p2p(pending + recv, desc="fill") if (pending or recv) else []
            if recv:
                self._frozen(k)  # in the shadow of the receive
                t0 = time.perf_counter()
                _wait_batch_p2p(works)
                self.trace.append(("wait", f"{kind}{i}", t0, time.perf_counter()))
            else:
                in_flight.append(works)
                self._frozen(k)
            t0 = time.perf_counter()
            if kind == "F":
                if inline:
                    args = resolved.pop(i) if i in resolved else self._timed(f"inline{i}", self.input_fn, i)
                    t0 = time.perf_counter()
                else:
                    args = arg_mbs[i]
                if lazy_targets and target_mbs[i] is None:
                    target_mbs[i] = self._timed(f"target{i}", self.target_fn, i)
                    t0 = time.perf_counter()
                out = stage.forward_one_chunk(i, args, kwarg_mbs[i], save_forward_output=return_outputs)
                self._maybe_compute_loss(stage, out, target_mbs, i, loss_kwargs)
                pending = stage.get_fwd_send_ops(i)
            else:
                stage.backward_one_chunk(i, loss=self._maybe_get_loss(stage, i), last_backward=k == last_b)
                pending = stage.get_bwd_send_ops(i)
            self.trace.append((kind, str(i), t0, time.perf_counter()))
        if pending:
            in_flight.append(_batch_p2p(pending, desc="fill_last_send"))
        self._frozen(len(self.order))
        for works in in_flight:
            _wait_batch_p2p(works)
        self._update_losses(stage, losses)
        stage.perform_reduce_grad(n if self.scale_grads else 1)


@dataclass
class FrozenModule:
    """Frozen work: ``fn(samples)`` maps a dict of batch-first inputs (a micro-batch or a slice of one) to a tuple
    of batch-first output tensors, under ``no_grad``. ``fn=None``: the module's weights are not held on this rank
    (frozen modules partitioned across the pp ranks, ``simulate.choose_owners``); its outputs still arrive."""
    name: str
    fn: Callable[[dict], tuple] | None

    def __call__(self, samples: dict) -> tuple:
        if self.fn is None:
            raise RuntimeError(f"frozen module {self.name!r} is not held on this pp rank, but work of it was placed "
                               "here: the plan's owners and the modules built disagree")
        return tuple(self.fn(samples))


def _slice(mb: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in mb.items()}


class FrozenFill:
    """Runs this rank's share of the next iteration's frozen work (``placement``: ``{slot: [Chunk]}``, this rank's
    part of ``simulate.fill_plan``) and delivers every micro-batch's outputs to all ranks of ``group``."""

    def __init__(self, modules: list[FrozenModule], placement: dict[int, list[Chunk]], group=None,
                 device: torch.device | None = None, spec: dict | None = None):
        """``spec``: output shapes per module, learned as modules run (pass the same dict to every step's
        FrozenFill so they are learned once)."""
        self.modules = {m.name: m for m in modules}
        self.device = device or torch.device("cpu")  # of outputs received from other ranks
        self.placement = placement
        self.group = group
        self._parts: list[tuple[Chunk, tuple]] = []
        self._spec: dict[str, list[tuple[torch.Size, torch.dtype, torch.device]]] = {} if spec is None else spec

    def run_all(self, mbs: list[dict]) -> list[dict[str, tuple]]:
        """Every micro-batch's frozen work on this rank (the first iteration, and the inline/balanced baselines)."""
        out = []
        with torch.no_grad():
            for mb in mbs:
                res = {name: m(mb) for name, m in self.modules.items()}
                for name, r in res.items():
                    self._learn(name, r)
                out.append(res)
        return out

    def share_spec(self, group) -> None:
        """Output shapes of the modules other ranks ran (partitioned modules): one exchange over ``group``."""
        specs = [None] * dist.get_world_size(group)
        dist.all_gather_object(specs, {k: [(tuple(s), d) for s, d, _ in v] for k, v in self._spec.items()},
                               group=group)
        for spec in specs:
            for k, v in spec.items():
                self._spec.setdefault(k, [(torch.Size(s), d, self.device) for s, d in v])

    def _learn(self, name: str, outs: tuple) -> tuple:
        self._spec.setdefault(name, [(t.shape[1:], t.dtype, t.device) for t in outs])
        return outs

    def slots(self, next_mbs: list[dict], tag: str = "") -> dict[int, list[tuple[str, Callable]]]:
        """The slot callables computing this rank's chunks of ``next_mbs``; results kept until :meth:`deliver`."""
        self._parts = []
        self._mb_size = len(next(iter(next_mbs[0].values())))
        out: dict[int, list] = {}
        for k, chunks in self.placement.items():
            for c in chunks:
                def run(c=c):
                    with torch.no_grad():
                        outs = self.modules[c.name](_slice(next_mbs[c.mb], c.lo, c.hi))
                        self._parts.append((c, self._learn(c.name, outs)))
                out.setdefault(k, []).append((f"{tag}{c.name}[{c.mb}:{c.lo}:{c.hi}]", run))
        return out

    def balanced(self, mbs: list[dict], rank: int, world: int,
                 owners: dict[str, set[int]] | None = None) -> list[dict[str, tuple]]:
        """The public-API fallback for any schedule: this rank computes its equal share of every module's samples
        (of the modules it holds, with ``owners``) now, then all ranks exchange (:meth:`deliver`)."""
        mb_size = len(next(iter(mbs[0].values())))
        self._mb_size, self._parts = mb_size, []
        with torch.no_grad():
            for c in balanced_chunks(sorted(self.modules), len(mbs), mb_size, world, owners)[rank]:
                outs = self.modules[c.name](_slice(mbs[c.mb], c.lo, c.hi))
                self._parts.append((c, self._learn(c.name, outs)))
        if set(self._spec) != set(self.modules):
            self.share_spec(self.group)
        return self.deliver(len(mbs))

    def deliver(self, n_mb: int) -> list[dict[str, tuple]]:
        """Assemble the chunks of all ranks: zero buffers, own pieces written in, one SUM all-reduce per output."""
        if set(self._spec) != set(self.modules):
            raise RuntimeError(f"FrozenFill.deliver: output shapes of {sorted(set(self.modules) - set(self._spec))} "
                               "unknown on this rank (run a first iteration with run_all, balanced or CurrentFill)")
        bufs = {name: [torch.zeros((n_mb, self._mb_size, *shape), dtype=_wire_dtype(dtype), device=dev)
                       for shape, dtype, dev in spec] for name, spec in self._spec.items()}
        for c, outs in self._parts:
            for buf, o in zip(bufs[c.name], outs):
                buf[c.mb, c.lo:c.hi] = o.to(buf.dtype)
        for name in sorted(bufs):
            for buf in bufs[name]:
                dist.all_reduce(buf, group=self.group)
        self._parts = []
        return [{name: tuple(b[i].to(d) for b, (_, d, _) in zip(bufs[name], self._spec[name])) for name in bufs}
                for i in range(n_mb)]


class CurrentFill:
    """This iteration's frozen work in this iteration's bubbles, for a step with nothing prefetched (the first, or
    the first after a resume): ``pieces`` is ``simulate.current_plan`` (every rank's, identical everywhere).
    A piece computed on a rank in a slot is sent at once to the first and the last segment's ranks (they are the
    only consumers: the first segment's inputs and the last segment's targets); inline pieces run on the first
    segment inside :meth:`input_fn`. The consumers post every receive up front, in each producer's execution order
    (the order NCCL needs), on ``p2p_group`` (a group of its own, so these messages never interleave with the
    pipeline's), and wait for a micro-batch's pieces right before they use it. ``make_input(i, outs)`` /
    ``make_target(i, outs)`` turn micro-batch i's outputs ``{module: tuple}`` into the segment's inputs / target.

    Output shapes, unless ``frozen`` already knows them, come from micro-batch 0's pieces (first in every rank's
    order: inline on the first segment, or before an owner's first action), computed at construction and
    exchanged once over ``group``."""

    def __init__(self, frozen: FrozenFill, pieces: dict[int, list], mbs: list[dict], group, p2p_group,
                 make_input: Callable[[int, dict], tuple], make_target: Callable[[int, dict], object]):
        self.frozen, self.mbs, self.p2p = frozen, mbs, p2p_group
        self.make_input, self.make_target = make_input, make_target
        world = dist.get_world_size(group)
        self.rank, self.first, self.last = dist.get_rank(group), 0, world - 1
        self.global_rank = {r: dist.get_global_rank(group, r) for r in range(world)}
        self.mb_size = len(next(iter(mbs[0].values())))
        self.mine = pieces[self.rank]
        self.parts: dict[int, list[tuple[Chunk, tuple]]] = {i: [] for i in range(len(mbs))}
        self.sends: list = []
        self.results: dict[int, dict[str, tuple]] = {}  # micro-batch -> outputs, on the consumers
        if set(frozen._spec) != set(frozen.modules):
            for _, c, _ in [p for p in self.mine if p[1].mb == 0]:
                self._run(c)  # sent now: micro-batch 0's pieces come first in every rank's order
            frozen.share_spec(group)
        self.recvs: dict[int, list] = {i: [] for i in range(len(mbs))}
        if self.rank in (self.first, self.last):
            for producer in sorted(pieces):
                if producer == self.rank:
                    continue
                for _, c, _ in pieces[producer]:
                    bufs = [torch.empty((c.hi - c.lo, *shape), dtype=_wire_dtype(dtype), device=dev)
                            for shape, dtype, dev in frozen._spec[c.name]]
                    works = [dist.irecv(b, src=self.global_rank[producer], group=p2p_group) for b in bufs]
                    self.recvs[c.mb].append((c, bufs, works))

    def _run(self, c: Chunk) -> None:
        if any(p is c for p, _ in self.parts[c.mb]):
            return  # micro-batch 0's inline pieces computed early for the output shapes
        with torch.no_grad():
            outs = self.frozen._learn(c.name, self.frozen.modules[c.name](_slice(self.mbs[c.mb], c.lo, c.hi)))
        self.parts[c.mb].append((c, outs))
        for dst in sorted({self.first, self.last} - {self.rank}):
            for o in outs:
                wire = o.to(_wire_dtype(o.dtype)).contiguous()  # kept alive until the send completes
                self.sends.append((dist.isend(wire, dst=self.global_rank[dst], group=self.p2p), wire))

    def slots(self, tag: str = "") -> dict[int, list[tuple[str, Callable]]]:
        out: dict[int, list] = {}
        for k, c, inline in self.mine:
            if not inline:
                out.setdefault(k, []).append((f"{tag}{c.name}[{c.mb}:{c.lo}:{c.hi}]", lambda c=c: self._run(c)))
        return out

    def outputs(self, i: int) -> dict[str, tuple]:
        """Micro-batch i's frozen outputs on a consumer: received pieces waited for, inline ones computed."""
        for _, c, inline in self.mine:
            if inline and c.mb == i:
                self._run(c)
        for c, bufs, works in self.recvs[i]:
            for w in works:
                w.wait()
            self.parts[i].append((c, tuple(bufs)))
        self.recvs[i] = []
        res = {}
        for name, spec in self.frozen._spec.items():
            mine = sorted(((c, o) for c, o in self.parts[i] if c.name == name), key=lambda p: p[0].lo)
            edges = [0] + [e for c, _ in mine for e in (c.lo, c.hi)] + [self.mb_size]
            if not mine or any(a != b for a, b in zip(edges[::2], edges[1::2])):
                raise RuntimeError(f"frozen output {name!r} of micro-batch {i} incomplete on rank {self.rank}")
            res[name] = tuple(torch.cat([o[j].to(dtype) for _, o in mine]) for j, (_, dtype, _) in enumerate(spec))
        self.results[i] = res
        return res

    def input_fn(self, i: int) -> tuple:
        return self.make_input(i, self.outputs(i))

    def target_fn(self, i: int):
        return self.make_target(i, self.outputs(i))

    def finish(self) -> None:
        """Wait for this rank's sends (after the step)."""
        for w, _ in self.sends:
            w.wait()
        self.sends = []


def balanced_chunks(names: list[str], n_mb: int, mb_size: int, world: int,
                    owners: dict[str, set[int]] | None = None) -> list[list[Chunk]]:
    """Per rank, an equal contiguous share of each module's ``n_mb x mb_size`` samples (over the module's owners
    only, with ``owners``), as chunks."""
    out: list[list[Chunk]] = [[] for _ in range(world)]
    total = n_mb * mb_size
    for name in names:
        ranks = sorted((owners or {}).get(name, range(world)))
        for j, r in enumerate(ranks):
            lo, hi = total * j // len(ranks), total * (j + 1) // len(ranks)
            while lo < hi:
                mb, off = divmod(lo, mb_size)
                end = min(hi, (mb + 1) * mb_size)
                out[r].append(Chunk(name, mb, off, off + end - lo))
                lo = end
    return out


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int32 if dtype == torch.bool else dtype
