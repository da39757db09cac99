"""Sample streams: the unit of data-parallel work, with an exact, JSON-able position.

**Positions.** Source ``i`` (spec.py) has ``S`` shards. Its shard *positions* ``j = 0, 1, 2, ...``
run over all epochs: in the finite mode position ``j`` is shard ``perm_e[j mod S]`` of epoch
``e = j // S``, where ``perm_e`` is a seeded permutation, so every epoch reads every shard once in a
fresh order; in the resampled mode position ``j`` is a shard drawn at random (with replacement).

**Streams.** A run has ``V`` streams; stream ``s`` reads the positions ``j ≡ s (mod V)`` of every
source in turn (its *tail*: ``start + k * stride`` for ``k = 0, 1, ...``). The streams therefore
partition every epoch's shards, so in the finite mode every sample is read exactly once per epoch
by exactly one stream. A stream draws each sample's source at random in proportion to the
sources' weights and passes it through an optional shuffle buffer (webdataset's scheme: fill
``N`` samples, then emit a random one and put the next sample in its place).

**State.** A stream's position is a small dict: per source the shard in progress as a
*work item* ``[j, sample_index, byte_offset]``, a queue of further work items (non-empty only after
a re-layout) and the tail; the counter ``n`` of random draws used (all randomness is a hash of
``(seed, stream, n)``, so no generator state is stored); and the shuffle buffer as *pointers*
``[source, j, sample_index, byte_offset]``, which :func:`tario.fetch` reads again on restore
(by seeking, on plain files). Restoring a state and iterating gives exactly the samples the
original stream would have given next; it reads at most one partial shard per source plus the
buffered samples.

**Re-layout.** :func:`relayout` turns the states of ``V`` streams into states of ``V'`` streams
that together read exactly what the old ones had left: the shards in progress, the buffered
samples, and every position not yet started. Nothing is repeated or lost, but the order differs
from an uninterrupted run with the old layout.
"""
from __future__ import annotations

import hashlib
import random
import struct
from typing import Callable, Iterator

from difftrain.data import tario
from difftrain.data.spec import Source


def unit(*parts) -> float:
    """A uniform in [0, 1) from a hash of ``parts``: the same on every process and platform."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return (struct.unpack("<Q", h)[0] >> 11) * (1.0 / (1 << 53))


class ShardSequence:
    """Position ``j`` -> (url, epoch) for one source."""

    def __init__(self, source: Source, index: int, seed: int, resampled: bool):
        self.urls, self.index, self.seed, self.resampled = source.urls, index, seed, resampled
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.urls)

    def at(self, j: int) -> tuple[str, int]:
        S = len(self.urls)
        e, m = divmod(j, S)
        if self.resampled:
            return self.urls[int(unit(self.seed, "resample", self.index, j) * S)], e
        if self._perm is None or self._perm[0] != e:
            perm = list(range(S))
            random.Random(f"{self.seed}:{self.index}:{e}").shuffle(perm)
            self._perm = (e, perm)
        return self.urls[self._perm[1][m]], e


def initial_state(s: int, V: int, n_sources: int) -> dict:
    return {"id": s, "n": 0, "src": [{"cur": None, "queue": [], "tail": [s, V, 0]} for _ in range(n_sources)],
            "buf": []}


def copy_state(st: dict) -> dict:
    return {"id": st["id"], "n": st["n"], "buf": [list(p) for p in st["buf"]],
            "src": [{"cur": list(c["cur"]) if c["cur"] else None, "queue": [list(q) for q in c["queue"]],
                     "tail": list(c["tail"])} for c in st["src"]]}


class Stream:
    """Iterate raw samples of one stream from a state (``iter(stream)``); ``state()`` between
    samples is the position of the next one.

    Raw samples carry ``__src__`` (source index), ``__epoch__`` and ``__ptr__`` besides tario's
    keys. Shards that cannot be read are reported to ``on_skip(reason, url, key, message)`` (which may
    raise to stop) and passed over; a source whose shards all fail in a row raises ``tario.ShardError``.
    ``opened`` counts the shards (and partial shards) it has started to read."""

    def __init__(self, state: dict, seqs: list[ShardSequence], weights: list[float], seed: int,
                 buffer_size: int, on_skip: Callable[[str, str, str, str], None]):
        self.st = copy_state(state)
        self.seqs, self.seed, self.N, self.on_skip = seqs, seed, buffer_size, on_skip
        total = float(sum(weights))
        self.cum = [sum(weights[:i + 1]) / total for i in range(len(weights))]
        self.readers: list[Iterator | None] = [None] * len(seqs)
        self.opened = 0
        self.buf: list[dict] = []
        if self.st["buf"]:
            ptrs = self.st["buf"]
            raws = tario.fetch([(seqs[p[0]].at(p[1])[0], p[2], p[3]) for p in ptrs])
            self.buf = [self._tag(raw, p[0], p[1]) for raw, p in zip(raws, ptrs)]

    def state(self) -> dict:
        return copy_state(self.st)

    def _draw(self) -> float:
        u = unit(self.seed, "stream", self.st["id"], self.st["n"])
        self.st["n"] += 1
        return u

    def _tag(self, raw: dict, i: int, j: int) -> dict:
        raw["__src__"], raw["__epoch__"] = i, self.seqs[i].at(j)[1]
        raw["__ptr__"] = [i, j, raw["__index__"], raw["__offset__"]]
        return raw

    def _next_item(self, c: dict) -> list[int]:
        if c["queue"]:
            return c["queue"].pop(0)
        start, stride, k = c["tail"]
        c["tail"][2] = k + 1
        return [start + k * stride, 0, 0]

    def _pull_from(self, i: int) -> dict:
        c, seq = self.st["src"][i], self.seqs[i]
        failures = 0
        while True:
            if c["cur"] is None:
                c["cur"] = self._next_item(c)
                self.readers[i] = None
            j, index, offset = c["cur"]
            url = seq.at(j)[0]
            try:
                if self.readers[i] is None:
                    self.readers[i] = tario.read_shard(url, index, offset)
                    self.opened += 1
                raw, nxt = next(self.readers[i])
            except StopIteration:
                c["cur"], self.readers[i] = None, None
                continue
            except tario.ShardError as e:
                self.on_skip(e.reason, url, "", str(e))
                c["cur"], self.readers[i] = None, None
                failures += 1
                if failures > max(len(seq), 1):
                    raise tario.ShardError(f"all {len(seq)} shards of data source {i} failed in a row; "
                                           f"last: {e}", e.reason) from e
                continue
            failures = 0
            c["cur"] = [j, raw["__index__"] + 1, nxt] if nxt != tario.END else None
            if c["cur"] is None:
                self.readers[i] = None
            return self._tag(raw, i, j)

    def _pull(self) -> dict:
        i = 0
        if len(self.cum) > 1:
            u = self._draw()
            i = next((k for k, c in enumerate(self.cum) if u < c), len(self.cum) - 1)
        return self._pull_from(i)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next()

    def next(self) -> dict:
        if self.N <= 1 and not self.buf:
            return self._pull()
        while len(self.buf) < self.N:  # (initial) fill
            raw = self._pull()
            self.buf.append(raw)
            self.st["buf"].append(raw["__ptr__"])
        if len(self.buf) == self.N:  # larger after a re-layout: drain without refilling
            raw = self._pull()
            self.buf.append(raw)
            self.st["buf"].append(raw["__ptr__"])
        k = int(self._draw() * len(self.buf))
        out = self.buf[k]
        self.buf[k], self.st["buf"][k] = self.buf[-1], self.st["buf"][-1]
        self.buf.pop()
        self.st["buf"].pop()
        return out


def relayout(states: list[dict], new_v: int) -> list[dict]:
    """States of ``V`` streams -> states of ``new_v`` streams that read exactly what is left.

    Per source, the work left is every stream's shard in progress and queued items, plus every
    tail position below the furthest one any stream has reached; those items are dealt out
    round-robin (in position order) and the tails continue above that frontier, ``new_v`` apart.
    Buffered sample pointers are dealt out round-robin; ``n`` restarts at 0 (fresh randomness)."""
    if not states:
        raise ValueError("relayout needs the states of every old stream")
    states = sorted(states, key=lambda s: s["id"])
    out = [initial_state(s, new_v, len(states[0]["src"])) for s in range(new_v)]
    for i in range(len(states[0]["src"])):
        items, frontier = [], 0
        for st in states:
            start, stride, k = st["src"][i]["tail"]
            frontier = max(frontier, start + k * stride)
        for st in states:
            c = st["src"][i]
            if c["cur"]:
                items.append(list(c["cur"]))
            items += [list(q) for q in c["queue"]]
            start, stride, k = c["tail"]
            j = start + k * stride
            while j < frontier:
                items.append([j, 0, 0])
                j += stride
        items.sort()
        for n, item in enumerate(items):
            out[n % new_v]["src"][i]["queue"].append(item)
        for s in range(new_v):
            out[s]["src"][i]["tail"] = [frontier + s, new_v, 0]
    ptrs = sorted(p for st in states for p in st["buf"])
    for n, p in enumerate(ptrs):
        out[n % new_v]["buf"].append(list(p))
    return out
