"""The streaming loader: exact, resumable, sharded over (rank, worker), tolerant of bad data.

**Layout.** The run's ``V = K * P`` streams (streams.py) form ``K`` groups of ``P``. Global batch
``g`` (``B`` samples, counted across epochs) is made by group ``g mod K``: each of its ``P`` streams
gives the next ``B / P`` good samples, in stream order. Rank ``r`` of ``W`` owns streams
``P r / W ... P (r+1) / W - 1`` of every group, so its slice of batch ``g`` has ``B / W`` rows. With
``n`` worker processes per rank (``K`` a multiple of ``n``), worker ``w`` makes the batches
``g ≡ g0 + w (mod n)`` and so owns its groups' streams alone: no two processes ever read the same
shard. Defaults: ``K = max(1, data.num_workers)`` (the ``groups`` argument sets it), ``P = data.streams``
or else ``W``.

The samples of batch ``g`` depend only on ``(K, P)``, the spec and the seed, not on ``W`` or ``n``:
a run resumed on any ``W`` dividing ``P`` with any ``n`` dividing ``K`` continues exactly. Other
world sizes re-lay the streams out (``streams.relayout``): the epoch continues with every remaining
sample exactly once, in a different order (a warning says so).

**State.** ``state_dict(g)`` is the position before batch ``g`` (the trainer asks for the batch
it has fetched but not trained on): the layout, ``g``, and this rank's stream states, which
include shuffle-buffer and bucket-pool pointers. Each rank saves its own; ``load_state_dict``
takes the list of every rank's dicts.

**Aspect-ratio buckets.** With several ``data.buckets`` each stream keeps a pool per bucket and
gives its ``B / P`` samples from the first bucket to fill, so every rank batch has one shape; this
needs one stream per rank per group (``P = W``).

**Bad data** is skipped and counted (``samples.py``, ``tario.py``): ``loader.skipped[reason]``;
a warning names shard and key at the 1st, 2nd, 4th, 8th, ... skip of each reason in a worker.
A local shard that does not exist is refused before anything is read (``spec.check_local``). The run
stops with :class:`DataError` (one line: the rank, ``data.train``, the reasons with their counts and the
last one) when

* more than ``max_skip_rate`` of the samples read are broken (``filtered:*`` aside), after ``MIN_SEEN``
  samples: checked over the rank's batches and, so that it fires even when no batch is ever made
  (every sample undecodable), in each worker over what it has read;
* in a worker, more than ``max_skip_rate`` of the shards it opened failed (``shard_*``), after
  ``MIN_SHARDS`` shards, or every shard of a source failed in a row (at once: all shards random bytes);
* a worker process dies (killed, out of memory, a crash in a decoder).

A worker reports these as a batch ``{"__error__": message}``, which the main process raises (not torch's
re-raise, whose message is the worker's traceback). Workers ignore SIGTERM (the trainer saves first,
then closes them), are killed with the process that started them (``PR_SET_PDEATHSIG`` on Linux), and are
shut down when the iterator is closed or raises: a failure never leaves a process behind.
"""
from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import signal
import sys
import threading
import time
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from difftrain.data import tario
from difftrain.data.decode import SkipSample
from difftrain.data.images import parse_buckets
from difftrain.data.samples import SampleDecoder
from difftrain.data.shm_batches import MainBuffers, WorkerBuffers, available, new_shared
from difftrain.data.spec import check_local, parse_spec
from difftrain.data.streams import ShardSequence, Stream, initial_state, relayout, unit
from difftrain.errors import DifftrainError

log = logging.getLogger(__name__)
MIN_SEEN = 200  # samples a rank (or a worker) reads before max_skip_rate applies to samples
MIN_SHARDS = 16  # shards a worker opens before max_skip_rate applies to shards
_AT_EXIT = False  # _stop_live_workers registered


class DataError(DifftrainError):
    """The data is mostly broken (or unreadable), or a loader worker died; the message (one line) says
    where, what was skipped and why."""


def _is_fault(reason: str) -> bool:
    return not reason.startswith("filtered:")


def _is_shard(reason: str) -> bool:
    return reason.startswith("shard_")  # tario.ShardError reasons: one count per shard


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _top(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def over_budget(skipped: dict, good: int, opened: int, rate: float) -> str | None:
    """What exceeds ``data.max_skip_rate`` (``rate``) in these counts, or None: more than ``rate`` of the
    samples read broken after ``MIN_SEEN``; more than ``rate`` of the ``opened`` shards failed after
    ``MIN_SHARDS`` (``opened=0``: not counted here)."""
    broken = sum(v for k, v in skipped.items() if _is_fault(k) and not _is_shard(k))
    seen = broken + good
    if seen >= MIN_SEEN and broken > rate * seen:
        return f"{broken} of {seen} samples read were broken"
    failed = sum(v for k, v in skipped.items() if _is_shard(k))
    if opened >= MIN_SHARDS and failed > rate * opened:
        return f"{failed} of {opened} shards opened failed"
    return None


class _Worker(IterableDataset):
    """Pickled into each worker: makes this worker's share of the rank's batches."""

    def __init__(self, ld: "ShardLoader", g0: int, states: dict, flags: torch.Tensor | None = None):
        self.ld, self.g0, self.states, self.flags = ld, g0, states, flags

    def __iter__(self) -> Iterator[dict]:
        """This worker's batches; a :class:`DataError` (or a source whose shards all fail) ends them with a
        last item ``{"__error__": one-line message}`` for the main process to raise."""
        info = get_worker_info()
        self.where = f"{self.ld.who}" + (f" (loader worker {info.id})" if info is not None else "")
        self.counts: collections.Counter = collections.Counter()
        self.delta: collections.Counter = collections.Counter()
        self.good, self.last, self.streams = 0, "", {}
        try:
            yield from self._batches(info)
        except DataError as e:
            yield {"__error__": str(e)}
        except tario.ShardError as e:  # every shard of a source failed in a row, or a saved position is gone
            skipped = f" (skipped so far: {_top(self.counts)})" if self.counts else ""
            yield {"__error__": _one_line(f"{self.ld.key} on {self.where}: {e}{skipped}", 600)}

    def _batches(self, info) -> Iterator[dict]:
        ld = self.ld
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        seqs = [ShardSequence(s, i, ld.seed, ld.resampled) for i, s in enumerate(ld.sources)]
        weights = [s.weight for s in ld.sources]
        streams, pools = self.streams, {}
        for s, saved in self.states.items():
            if (s // ld.P) % nw == (self.g0 + w) % nw:  # the groups this worker makes
                streams[s] = Stream(saved["stream"], seqs, weights, ld.seed, ld.shuffle_buffer, self._skip)
                pools[s] = self._restore_pool(saved["pool"], seqs)
        g = self.g0 + w
        buffers = WorkerBuffers(self.flags, w) if self.flags is not None and info is not None else None
        while True:
            k = g % ld.K
            rows, after = [], {}
            for p in range(ld.lo, ld.hi):
                s = k * ld.P + p
                items = self._take(streams[s], pools[s])
                for i, item in enumerate(items):
                    item["index"] = g * ld.B + p * ld.m + i
                rows += items
                after[s] = {"stream": streams[s].state(),
                            "pool": [[b, *it["ptr"]] for b, pool in sorted(pools[s].items()) for it in pool]}
            batch = collate(rows, buffers)
            batch.update(position={"g": g}, states=after, skipped=dict(self.delta), good=len(rows))
            self.delta.clear()
            yield batch
            g += nw

    def _rand(self, raw: dict):
        seed, epoch, url, key = self.ld.seed, raw["__epoch__"], raw["__url__"], raw["__key__"]
        return lambda name: unit(seed, "item", name, epoch, url, key)

    def _decode(self, raw: dict) -> dict | None:
        try:
            item = self.ld.decoder(raw, self._rand(raw))
        except SkipSample as e:
            self._skip(e.reason, raw.get("__url__", "?"), raw.get("__key__", "?"), str(e))
            return None
        except Exception as e:  # bad bytes are data, not a crash
            self._skip("decode_error", raw.get("__url__", "?"), raw.get("__key__", "?"), f"{type(e).__name__}: {e}")
            return None
        item.update(key=raw["__key__"], url=raw["__url__"], epoch=raw["__epoch__"], ptr=raw["__ptr__"])
        self.good += 1
        return item

    def _take(self, stream: Stream, pool: dict) -> list[dict]:
        m = self.ld.m
        if len(self.ld.buckets) == 1:
            out = []
            while len(out) < m:
                item = self._decode(stream.next())
                if item is not None:
                    out.append(item)
            return out
        while True:
            full = [b for b, items in sorted(pool.items()) if len(items) >= m]
            if full:
                out, pool[full[0]] = pool[full[0]][:m], pool[full[0]][m:]
                return out
            item = self._decode(stream.next())
            if item is not None:
                pool.setdefault(item["bucket"], []).append(item)

    def _restore_pool(self, saved: list, seqs) -> dict:
        pool: dict[int, list] = {}
        raws = tario.fetch([(seqs[p[1]].at(p[2])[0], p[3], p[4]) for p in saved]) if saved else []
        for p, raw in zip(saved, raws):
            raw["__src__"], raw["__epoch__"], raw["__ptr__"] = p[1], seqs[p[1]].at(p[2])[1], list(p[1:])
            item = self._decode(raw)  # decoded before, so it decodes again
            if item is not None:
                pool.setdefault(p[0], []).append(item)
        return pool

    def _skip(self, reason: str, url: str, key: str, message: str) -> None:
        self.counts[reason] += 1
        self.delta[reason] += 1
        self.last = message
        n = self.counts[reason]
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: rate-limited
            log.warning("skipped (%s, %d so far in this worker): %s", reason, n, message)
        if _is_fault(reason):  # checked here, so it fires even when no batch is ever made
            opened = sum(st.opened for st in self.streams.values())
            what = over_budget(self.counts, self.good, opened, self.ld.max_skip_rate)
            if what is not None:
                raise DataError(self.ld.budget_message(self.where, what, self.counts, self.last))


def collate(rows: list[dict], buffers: WorkerBuffers | None = None) -> dict:
    """Items -> batch: tensors stacked, the rest as lists; the names of int lists in ``"longs"``, which
    :func:`as_longs` turns into long tensors in the main process (each small tensor a worker sends costs its
    own shared-memory segment and file descriptor: ~0.7 ms, more than the list)."""
    out: dict = {"longs": []}
    names = {"key": "keys", "url": "urls", "epoch": "epochs", "caption": "captions", "label": "labels"}
    for k in rows[0]:
        if k in ("ptr", "bucket"):
            continue
        vals = [r[k] for r in rows]
        name = names.get(k, k)
        if isinstance(vals[0], torch.Tensor):
            out[name] = _stack(vals, buffers)
        elif isinstance(vals[0], int) and not isinstance(vals[0], bool):
            out[name] = vals
            out["longs"].append(name)
        else:
            out[name] = vals
    return out


def as_longs(batch: dict) -> dict:
    """The int lists :func:`collate` named, as long tensors (in place)."""
    for name in batch.pop("longs", ()):
        batch[name] = torch.tensor(batch[name], dtype=torch.long)
    return batch


def _stack(vals: list[torch.Tensor], buffers: WorkerBuffers | None = None):
    """``torch.stack``. Images laid out channels-innermost (PIL's, kept by ``ImageTransform``) are stacked
    channels-last, [B, C, H, W] with ``torch.channels_last`` strides, so no sample is transposed on the CPU
    (the model's first layer takes either layout). In a worker process the batch is made straight in shared
    memory, as DataLoader's own collate does, and in a reused buffer when ``buffers`` has a free one
    (``shm_batches``): sending it to the main process then moves no bytes and faults in no new pages."""
    hwc = vals[0].ndim == 3 and vals[0].shape[0] > 1 and vals[0].stride(0) == 1
    if hwc:
        vals = [v.permute(1, 2, 0) for v in vals]
    if buffers is not None:
        return buffers.stack(vals, (0, 3, 1, 2) if hwc else None)
    out = new_shared(vals[0], len(vals)) if get_worker_info() is not None else None
    out = torch.stack(vals, out=out)
    return out.permute(0, 3, 1, 2) if hwc else out


def _as_is(batch: dict) -> dict:
    """The worker's batch is final: skip DataLoader's default_convert walk over it (~25 us a sample)."""
    return batch


def _init_worker(parent: int, _worker_id: int) -> None:
    """Pre-emption sends SIGTERM to the whole process group: workers ignore it and leave it to the trainer,
    which saves a checkpoint and then shuts them down. So that they never outlive the trainer (killed,
    crashed), the kernel sends them SIGKILL when the thread that started them exits (``PR_SET_PDEATHSIG``,
    Linux; torch's own watchdog checks the parent only between batches)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    try:
        os.kill(parent, 0)  # gone before the line above: nothing would ever kill this worker
    except ProcessLookupError:
        os._exit(1)


def _who(rank: int) -> str:
    """``rank R`` (the process's rank when a process group runs; its data-parallel rank when that differs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != rank:
        return f"rank {dist.get_rank()} (data rank {rank})"
    return f"rank {rank}"


def _worker_died(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker (pid")


def _dead_workers(it, wait: float = 2.0) -> str:
    """The workers of DataLoader iterator ``it`` that have exited (``"DataLoader worker (pid X) ..."``), or
    "". A worker killed while it sent a batch makes the main process fail to read the batch (the worker's
    descriptor server is gone) a moment before the kernel reports it dead: so wait for it up to ``wait`` s."""
    workers, end = list(getattr(it, "_workers", ())), time.monotonic() + wait
    dead = [w for w in workers if not w.is_alive()]
    while workers and not dead and time.monotonic() < end:
        time.sleep(0.05)
        dead = [w for w in workers if not w.is_alive()]
    return "; ".join(f"DataLoader worker (pid {w.pid}) " + (
        f"is killed by signal: {signal.Signals(-w.exitcode).name}" if w.exitcode < 0
        else f"exited with code {w.exitcode}") for w in dead)


def _note_worker_deaths(loader: "ShardLoader") -> None:
    """torch's SIGCHLD handler raises ``RuntimeError("DataLoader worker (pid X) is killed by signal ...")``
    wherever the main thread is when a worker dies: wrap it (once per process) to raise a one-line
    :class:`DataError` naming the rank instead."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if getattr(current, "difftrain_loader", None) is not None:
        current.difftrain_loader[0] = loader
        return
    if not callable(current):
        return

    def handler(signum, frame):
        try:
            current(signum, frame)
        except RuntimeError as e:
            if _worker_died(e) and handler.difftrain_loader[0] is not None:
                raise DataError(handler.difftrain_loader[0].death_message(e)) from None
            raise

    handler.difftrain_loader = [loader]
    signal.signal(signal.SIGCHLD, handler)


_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators whose workers may still run


def _stop_live_workers() -> None:
    """At exit: kill the workers of iterators nobody closed (an exception ended the program while a loader
    was open). Registered after multiprocessing's own exit hook, so it runs first: that hook terminates
    daemon processes with SIGTERM, which workers ignore, and then joins them forever."""
    for it in list(_LIVE):
        _stop_workers(it, now=True)


def _stop_workers(it, now: bool) -> None:
    """Shut down the worker processes of a DataLoader iterator ``it``: at once (SIGKILL: ``now``, after an
    error) or by torch's shutdown (each worker finishes its batch; up to 5 s each), then SIGKILL whatever
    is left, since workers ignore torch's SIGTERM."""
    workers = list(getattr(it, "_workers", ()))
    if not workers:
        return
    if getattr(it, "_worker_pids_set", False):  # no SIGCHLD error for workers stopped on purpose
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    try:
        if now:
            for w in workers:
                if w.is_alive():
                    w.kill()
        it._shutdown_workers()
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(timeout=5)
        _LIVE.discard(it)


class ShardLoader:
    """This rank's slice of the global batch stream; iterate for batches forever.

    A batch is ``{"pixels": uint8 [b, C, H, W] (float [-1, 1] on the device: ``to_unit``; video: float
    [b, T, C, H, W]), "captions": list[str], "labels": long [b] (json "label", else cls, else -1), "keys", "urls":
    list[str], "epochs": long [b], "index": long [b] (global slot g*B + i, the key of per-sample
    randomness), "position": {"g"}}`` with ``b = batch_size / world``. Latent shards (``data.kind=latent``,
    :mod:`difftrain.data.latents`) give ``latent_mean`` (and ``latent_std``, ``noise``, ``text_states``,
    ``text_mask`` where the shards hold them), [b, ...] each, instead of ``pixels``. With ``data.control``
    image batches also carry ``control``, ControlNet's condition images, like ``pixels`` (``samples.py``).
    """

    def __init__(self, spec, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 seed: int = 0, decoder: SampleDecoder | None = None, shuffle_buffer: int = 0,
                 resampled: bool = False, streams: int = 0, max_skip_rate: float = 0.5,
                 prefetch_factor: int = 2, channels: int = 3, image_size: int = 32, groups: int = 0,
                 key: str = "data.train", check_paths: bool = True):
        if batch_size <= 0 or world <= 0 or batch_size % world:
            raise ValueError(f"config key 'data.batch_size' = {batch_size} must be a positive "
                             f"multiple of the data-parallel world size {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the data-parallel world of {world}")
        if num_workers < 0:
            raise ValueError(f"config key 'data.num_workers' must be >= 0, got {num_workers}")
        if shuffle_buffer < 0:
            raise ValueError(f"config key 'data.shuffle_buffer' must be >= 0, got {shuffle_buffer}")
        if not 0.0 < max_skip_rate <= 1.0:
            raise ValueError(f"config key 'data.max_skip_rate' must be in (0, 1], got {max_skip_rate}")
        self.sources = parse_spec(spec, key)
        if check_paths:  # a local shard that does not exist: refused now, in one line
            check_local(spec, key)
        self.key, self.spec = key, spec if isinstance(spec, str) else _one_line(repr(spec), 200)
        self.who = f"rank {rank}"
        self.decoder = decoder or SampleDecoder(channels=channels, buckets=[(image_size, image_size)])
        self.buckets = self.decoder.buckets
        self.B, self.rank, self.world, self.num_workers = batch_size, rank, world, num_workers
        self.seed, self.shuffle_buffer, self.resampled = seed, shuffle_buffer, resampled
        self.max_skip_rate, self.prefetch_factor = max_skip_rate, prefetch_factor
        self.skipped: dict[str, int] = {}
        self.good = 0
        if groups and groups % max(1, num_workers):
            raise ValueError(f"{groups} stream groups cannot be split over {num_workers} workers")
        self._set_layout(groups or max(1, num_workers), streams or world)
        self._g = 0
        self._states = {s: self._fresh(s) for s in self._own()}
        self._snaps: collections.OrderedDict[int, dict] = collections.OrderedDict()

    @classmethod
    def from_config(cls, d, rank: int, world: int, seed: int) -> "ShardLoader":
        """Build from a :class:`difftrain.config.DataConfig`."""
        decoder = SampleDecoder(d.kind, d.channels, parse_buckets(d.buckets, d.image_size), d.crop, d.flip,
                                d.min_image_size, d.require_caption, d.filters, d.frames, d.frame_stride, d.fps,
                                d.control)
        return cls(d.train, d.batch_size, rank, world, d.num_workers, seed, decoder, d.shuffle_buffer,
                   d.resampled, d.streams, d.max_skip_rate)

    # ------------------------------------------------------------------------------ layout
    def _set_layout(self, K: int, P: int) -> None:
        W = self.world
        if P % W or self.B % P:
            raise ValueError(f"config key 'data.streams' = {P} must be a multiple of the data-parallel world "
                             f"size {W} and divide data.batch_size = {self.B}")
        if len(self.buckets) > 1 and P != W:
            raise ValueError(f"config key 'data.buckets' needs one stream per rank: data.streams = {P} "
                             f"must equal the data-parallel world size {W}")
        self.K, self.P, self.m = K, P, self.B // P
        self.lo, self.hi = self.rank * P // W, (self.rank + 1) * P // W

    def _own(self) -> list[int]:
        return [k * self.P + p for k in range(self.K) for p in range(self.lo, self.hi)]

    def _fresh(self, s: int) -> dict:
        return {"stream": initial_state(s, self.K * self.P, len(self.sources)), "pool": []}

    def exact_resume(self, layout) -> bool:
        K, P = layout
        return K % max(1, self.num_workers) == 0 and P % self.world == 0 and self.B % P == 0 and (
            len(self.buckets) == 1 or P == self.world)

    # ------------------------------------------------------------------------------ state
    def state_dict(self, g: int | None = None) -> dict:
        """The position before global batch ``g`` (default: the next one this iterator yields)."""
        if g is not None and g != self._g:
            if g not in self._snaps:
                raise ValueError(f"no loader state kept for batch {g} (next is {self._g})")
            return self._snaps[g]
        return {"layout": [self.K, self.P], "g": self._g, "streams": {str(s): v for s, v in self._states.items()},
                "sources": [len(s.urls) for s in self.sources]}

    def load_state_dict(self, sds: dict | list[dict]) -> None:
        """Restore from the state dicts of every rank of the saving run (one dict: a single rank)."""
        sds = [sds] if isinstance(sds, dict) else list(sds)
        gs = {int(sd["g"]) for sd in sds}
        layouts = {tuple(sd["layout"]) for sd in sds}
        if len(gs) != 1 or len(layouts) != 1:
            raise ValueError(f"data loader states disagree across ranks (g {sorted(gs)}, layouts {sorted(layouts)})")
        nsrc = [len(s.urls) for s in self.sources]
        if any(sd.get("sources", nsrc) != nsrc for sd in sds):
            raise ValueError(f"data loader state was saved for sources with {sds[0].get('sources')} shards; "
                             f"data.train now has {nsrc}: resume needs the same shard spec")
        every = {int(s): v for sd in sds for s, v in sd["streams"].items()}
        (K, P), = layouts
        if len(every) != K * P:
            raise ValueError(f"data loader state covers {len(every)} of {K * P} streams: need every rank's state")
        self._g = gs.pop()
        if self.exact_resume((K, P)):
            self._set_layout(K, P)
            self._states = {s: every[s] for s in self._own()}
        else:
            log.warning("data: resuming the layout of %d x %d streams on %d rank(s) x %d worker(s) is not exact: "
                        "the epoch continues without repeats, in a different order", K, P, self.world,
                        max(1, self.num_workers))
            self._set_layout(max(1, self.num_workers), self.world)
            old = [every[s]["stream"] for s in sorted(every)]
            for st, s in zip(old, sorted(every)):  # bucket pools go back through the buffer
                st["buf"] += [p[1:] for p in every[s]["pool"]]
            new = relayout(old, self.K * self.P)
            self._states = {s: {"stream": new[s], "pool": []} for s in self._own()}
        self._snaps.clear()

    # ------------------------------------------------------------------------------ iterate
    def __iter__(self) -> Iterator[dict]:
        """Batches forever. Raises :class:`DataError` (one line) for mostly broken data and for a worker that
        died; the workers stop when this iterator raises or is closed (``close()``, or garbage collection)."""
        nw = self.num_workers
        self.who = _who(self.rank)
        # reused batch buffers: the prefetched batches, the one being made, and up to 3 the consumer holds (a
        # buffer per batch tensor: two with control images)
        per = 2 if getattr(self.decoder, "control", "") else 1  # a decoder of its own (data stat) has none
        bufs = MainBuffers(nw, (self.prefetch_factor + 4) * per) if nw > 0 and available() else None
        worker = _Worker(self, self._g, dict(self._states), bufs.flags if bufs is not None else None)
        loader = DataLoader(worker, batch_size=None, collate_fn=_as_is,
                            num_workers=nw, persistent_workers=nw > 0,
                            prefetch_factor=self.prefetch_factor if nw > 0 else None,
                            worker_init_fn=functools.partial(_init_worker, os.getpid()) if nw > 0 else None)
        it, failed = iter(loader), True
        try:
            if nw > 0:
                global _AT_EXIT
                if not _AT_EXIT:
                    atexit.register(_stop_live_workers)
                    _AT_EXIT = True
                _LIVE.add(it)
                _note_worker_deaths(self)
            while True:
                try:
                    batch = next(it)
                except DataError:  # torch's SIGCHLD handler, wrapped by _note_worker_deaths
                    raise
                except Exception as e:  # torch's own report of a dead worker, or a failed read of its batch
                    dead = _worker_died(e) or _dead_workers(it)
                    if dead:
                        raise DataError(self.death_message(e if dead is True else dead)) from None
                    raise
                if "__error__" in batch:
                    raise DataError(batch["__error__"])
                if bufs is not None:
                    batch = {k: bufs.resolve(v) for k, v in batch.items()}
                g = batch["position"]["g"] = int(batch["position"]["g"])
                self._snaps[g] = self.state_dict()
                while len(self._snaps) > 4:
                    self._snaps.popitem(last=False)
                self._states.update(batch.pop("states"))
                self._g = g + 1
                self._account(batch.pop("skipped"), int(batch.pop("good")))
                yield as_longs(batch)
                if bufs is not None:
                    bufs.release()  # the batches the consumer has dropped
        except GeneratorExit:  # closed by the consumer (the end of a run, or its own error): torch's shutdown
            failed = False
            raise
        finally:
            _stop_workers(it, now=failed)

    def counts(self) -> dict[str, int]:
        """Running totals on this rank: ``good`` and ``skipped/<reason>``."""
        return {"good": self.good, **{f"skipped/{k}": v for k, v in self.skipped.items()}}

    def _account(self, skipped: dict, good: int) -> None:
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.good += good
        what = over_budget(self.skipped, self.good, 0, self.max_skip_rate)
        if what is not None:
            raise DataError(self.budget_message(self.who, what, self.skipped, ""))

    def budget_message(self, where: str, what: str, counts: dict, last: str) -> str:
        """The one line of a :class:`DataError` for ``data.max_skip_rate`` exceeded."""
        return _one_line(f"data.max_skip_rate={self.max_skip_rate} exceeded on {where}: {what} ({_top(counts)}) "
                         f"in {self.key}={self.spec}" + (f"; last: {_one_line(last, 200)}" if last else ""), 600)

    def death_message(self, e: BaseException | str) -> str:
        """The one line of a :class:`DataError` for a worker that died (torch's message: its pid and signal)."""
        text = _one_line(str(e).split("Details are lost")[0], 200)
        return (f"a data loader worker of {self.who} died reading {self.key}={_one_line(self.spec, 120)}: {text} "
                f"(out of memory? see the kernel log; data.num_workers=0 runs the same code in this process)")
