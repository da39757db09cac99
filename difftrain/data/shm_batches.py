"""Reusable shared-memory batch buffers between loader workers and the main process.

A batch a worker sends normally lives in a new shared-memory segment: the worker faults in every page
of it (the kernel zeroes each one), the main process maps it again, and a file descriptor travels per
tensor. For a uint8 batch of 32 x 3 x 256 x 256 that is ~5 ms of a worker's time, ~10% of decoding the
batch (``benchmarks/data_throughput.py``). Here each worker keeps ``slots`` buffers and reuses them:

* The main process makes a shared int32 table ``flags[worker, slot]`` before the workers start.
* A worker stacks a batch tensor into a free slot's buffer (``flags == 0``), marks it busy and sends it.
  The first time a buffer is sent it travels as a tensor (one descriptor); later sends are a
  :class:`Ref` (slot, shape, strides), which the main process resolves against the storage it kept.
* The main process marks a slot free once nothing but its own cache holds the storage (no batch, view
  or slice of it is alive): the storage's use count, checked before each batch is taken.
* A worker that finds no free slot (the consumer keeps many batches) allocates a one-off segment, as
  DataLoader does: reuse never blocks and never overwrites a batch still in use.

Only this module touches torch internals (``_new_shared``, ``_storage_Use_Count``); without them the
loader falls back to one-off segments.
"""
from __future__ import annotations

import dataclasses

import torch


def available() -> bool:
    return hasattr(torch._C, "_storage_Use_Count") and hasattr(torch.UntypedStorage, "_new_shared")


def _view(storage, dtype, shape, stride) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, stride)


def new_shared(like: torch.Tensor, n: int) -> torch.Tensor:
    """An uninitialised contiguous ``[n, *like.shape]`` tensor in a one-off shared-memory segment."""
    storage = torch.UntypedStorage._new_shared(n * like.numel() * like.element_size())
    return _view(storage, like.dtype, (n, *like.shape), torch.empty(n, *like.shape, device="meta").stride())


@dataclasses.dataclass(frozen=True)
class Fresh:
    """A batch tensor in a buffer sent for the first time: the main process keeps its storage."""
    tensor: torch.Tensor
    key: tuple  # (worker, slot, generation)


@dataclasses.dataclass(frozen=True)
class Ref:
    """A batch tensor in a buffer the main process already holds."""
    key: tuple  # (worker, slot, generation)
    dtype: torch.dtype
    shape: tuple
    stride: tuple


class WorkerBuffers:
    """The worker side: ``stack(vals)`` -> what to send (a tensor or a :class:`Ref`)."""

    def __init__(self, flags: torch.Tensor, worker: int):
        self.flags, self.w = flags, worker
        self.buffers: dict[int, tuple[int, torch.UntypedStorage]] = {}  # slot -> (generation, storage)
        self.sent: set[tuple] = set()

    def stack(self, vals: list[torch.Tensor], dims: tuple | None = None):
        """``torch.stack(vals).permute(dims)`` in a buffer: a tensor, :class:`Fresh` or :class:`Ref`."""
        first, n = vals[0], len(vals)
        nbytes = n * first.numel() * first.element_size()
        free = [s for s in range(self.flags.shape[1]) if int(self.flags[self.w, s]) == 0]
        if not free:
            out = torch.stack(vals, out=new_shared(first, n))
            return out.permute(*dims) if dims else out
        slot = next((s for s in free if s in self.buffers and self.buffers[s][1].nbytes() >= nbytes), free[0])
        gen, storage = self.buffers.get(slot, (-1, None))
        if storage is None or storage.nbytes() < nbytes:  # new, or too small for this shape (buckets)
            gen, storage = gen + 1, torch.UntypedStorage._new_shared(nbytes)
            self.buffers[slot] = gen, storage
        out = _view(storage, first.dtype, (n, *first.shape), torch.empty(n, *first.shape, device="meta").stride())
        torch.stack(vals, out=out)
        out = out.permute(*dims) if dims else out
        self.flags[self.w, slot] = 1
        key = (self.w, slot, gen)
        if key in self.sent:
            return Ref(key, out.dtype, tuple(out.shape), tuple(out.stride()))
        self.sent.add(key)
        return Fresh(out, key)


class MainBuffers:
    """The main process side: ``flags`` to give the workers, ``resolve`` each received value,
    ``release`` before taking the next batch."""

    def __init__(self, workers: int, slots: int):
        self.flags = torch.zeros(workers, slots, dtype=torch.int32).share_memory_()
        self.cache: dict[tuple, torch.UntypedStorage] = {}
        self.busy: set[tuple] = set()

    def resolve(self, value):
        if isinstance(value, Ref):
            storage = self.cache[value.key]
            out, key = _view(storage, value.dtype, value.shape, value.stride), value.key
        elif isinstance(value, Fresh):
            out, key = value.tensor, value.key
            w, slot, _ = key
            for old in [k for k in self.cache if k[:2] == (w, slot)]:  # an older generation of this slot
                del self.cache[old]
            self.cache[key] = out.untyped_storage()
        else:
            return value
        self.busy.add(key)
        return out

    def release(self) -> None:
        for key in list(self.busy):
            if torch._C._storage_Use_Count(self.cache[key]._cdata) == 1:  # only our cache holds it
                self.busy.discard(key)
                self.flags[key[0], key[1]] = 0
