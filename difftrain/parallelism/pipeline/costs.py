"""Cost profiles for pipeline planning: per-block forward/backward time, wire and saved-activation bytes, and
the frozen work (text encoder, VAE encoder, teacher) a pipeline has to place somewhere.

Two sources, one shape (:class:`Profile`):

* ``profile_blocks(model, inputs, timer="flops")``: FLOPs counted with ``torch.utils.flop_counter`` on the meta
  device (no memory, any size: DiT-XL/2, a 30B DiT) and turned into seconds by a :class:`Hardware` (peak FLOP/s x
  an assumed utilisation). Backward = 2 x forward (weight + input gradients of matmuls, Narayanan et al. 2021,
  sec. 3.5), which the counter confirms on our DiT.
* ``timer="wall"``: the same pieces run for real on the device and timed (median of ``reps``), what the
  benchmark calibrates the simulator with.

A block's cost is that of the one-block segment ``make_segment(model, i, i + 1)``, so the embeddings ride with block
0 and the output head with the last block, exactly where the segment cutter puts them.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from difftrain.parallelism.pipeline.segments import make_segment, num_blocks, wire_bytes


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s of one accelerator
    mfu: float  # assumed model FLOP utilisation (planning assumption, stated in the plan's output)
    memory: float  # bytes per accelerator
    p2p_bw: float  # bytes/s between pipeline neighbours inside a node
    net_bw: float  # bytes/s per accelerator across nodes (data-parallel collectives, segments on other nodes)
    gpus_per_node: int = 8
    latency: float = 20e-6  # seconds per message


# Vendor peak dense bf16 figures (NVIDIA A100 / H100 SXM datasheets); bandwidths are effective per-GPU figures
# (NVLink inside a node, one 200-400 Gb/s NIC per GPU across nodes). Utilisation 0.4 is a planning assumption.
HARDWARE = {
    "a100": Hardware("A100-SXM4-80GB", 312e12, 0.4, 80e9, 150e9, 25e9),
    "h100": Hardware("H100-SXM5-80GB", 989e12, 0.4, 80e9, 300e9, 50e9),
}


@dataclass
class BlockCost:
    fwd: float  # seconds per micro-batch
    bwd: float
    out_bytes: int  # what this block's segment would send downstream (the wire), per micro-batch
    saved_bytes: int  # activations kept for backward, per micro-batch
    params: int  # parameter count


@dataclass
class FrozenCost:
    name: str
    fwd: float  # seconds per micro-batch (no backward: frozen)
    out_bytes: int  # result bytes per micro-batch
    params: int
    consumer: str = "first"  # the segment that needs the result: "first" (latents, text) or "last" (teacher)
    fixed: float = 0.0  # seconds of a call whatever its samples (launches, tokenising): see chunk_seconds

    def chunk_seconds(self, n: int, mb_size: int) -> float:
        """A call on ``n`` of a micro-batch's ``mb_size`` samples: affine in n (``fwd`` at n = mb_size, ``fixed`` +
        one sample's share at n = 1), so splitting a micro-batch over bubbles is charged what small calls cost."""
        return self.fixed + (self.fwd - self.fixed) * n / mb_size


@dataclass
class Profile:
    blocks: list[BlockCost]
    frozen: list[FrozenCost] = field(default_factory=list)
    mb_size: int = 1  # samples per micro-batch the costs are for
    p2p_bw: float = float("inf")  # bytes/s between neighbouring segments
    latency: float = 0.0
    overhead: float = 0.0  # seconds per forward or backward action (runtime bookkeeping; calibrated)

    def comm(self, i: int) -> float:
        """Seconds to move block i's output (or its gradient) to the next segment."""
        return self.blocks[i].out_bytes / self.p2p_bw + self.latency

    def scaled(self, mb_size: int) -> "Profile":
        """The same profile for another micro-batch size (costs linear in the batch: a planning model)."""
        r = mb_size / self.mb_size
        blocks = [BlockCost(b.fwd * r, b.bwd * r, int(b.out_bytes * r), int(b.saved_bytes * r), b.params)
                  for b in self.blocks]
        frozen = [FrozenCost(f.name, f.fixed + (f.fwd - f.fixed) * r, int(f.out_bytes * r), f.params, f.consumer,
                             f.fixed) for f in self.frozen]
        return Profile(blocks, frozen, mb_size, self.p2p_bw, self.latency, self.overhead)

    @property
    def backbone_time(self) -> float:
        return sum(b.fwd + b.bwd for b in self.blocks)

    @property
    def frozen_time(self) -> float:
        return sum(f.fwd for f in self.frozen)


class _SavedBytes:
    """Bytes of activations autograd saves for backward (parameters and their views excluded)."""

    def __init__(self, params: set[int]):
        self.params, self.total = params, 0

    def __enter__(self):
        def pack(t):
            base = t._base if t._base is not None else t
            if id(base) not in self.params and id(t) not in self.params:
                self.total += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _tree_detach(args: tuple) -> tuple:
    return tuple(a.detach().requires_grad_(a.is_floating_point()) for a in args)


def meta_inputs(acfg, frames: int = 0, text_len: int = 0, batch: int = 1, dtype=torch.float32) -> tuple:
    """First-segment inputs ``(x_t, t, *cond)`` of an architecture config, on the meta device (for FLOP counts)."""
    with torch.device("meta"):
        side = acfg.image_size
        shape = (batch, frames, acfg.in_channels, side, side) if frames else (batch, acfg.in_channels, side, side)
        args = [torch.randn(*shape, dtype=dtype), torch.rand(batch)]
        if getattr(acfg, "num_classes", 0):
            args.append(torch.zeros(batch, dtype=torch.long))
        elif getattr(acfg, "text_dim", 0):
            args += [torch.randn(batch, text_len, acfg.text_dim, dtype=dtype),
                     torch.ones(batch, text_len, dtype=torch.bool)]
    return tuple(args)


def _wall(fn: Callable, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_blocks(model: nn.Module, inputs: Sequence[torch.Tensor], timer: str = "flops",
                   hardware: Hardware | None = None, reps: int = 5) -> list[BlockCost]:
    """Per-block costs of ``model`` for the first-segment ``inputs`` ``(x_t, t, *cond)`` (one micro-batch).

    ``timer="flops"``: ``model`` and ``inputs`` on the meta device, seconds = FLOPs / (peak x mfu).
    ``timer="wall"``: materialised, timed for real (median of ``reps`` after one warm-up)."""
    from torch.utils.flop_counter import FlopCounterMode

    if timer not in ("flops", "wall"):
        raise ValueError(f"timer must be 'flops' or 'wall', got {timer!r}")
    if timer == "flops" and hardware is None:
        raise ValueError("timer='flops' needs a Hardware to turn FLOPs into seconds")
    costs, args = [], tuple(inputs)
    for i in range(num_blocks(model)):
        piece = make_segment(copy.deepcopy(model), i, i + 1)
        params = {id(p) for p in piece.parameters()}
        x = _tree_detach(args)
        with _SavedBytes(params) as saved:
            out = piece(*x)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) for o in outs if o.requires_grad]
        if timer == "flops":
            with FlopCounterMode(display=False) as fc:
                piece(*_tree_detach(args))
            fwd = fc.get_total_flops() / (hardware.peak_flops * hardware.mfu)
            bwd = 2 * fwd
        else:
            def run_fwd():
                return piece(*_tree_detach(args))

            def run_bwd(o):
                o = o if isinstance(o, tuple) else (o,)
                torch.autograd.backward([t for t in o if t.requires_grad], grads)

            run_bwd(run_fwd())  # warm-up
            fwd = _wall(lambda: run_fwd(), reps)
            times = []
            for _ in range(reps):  # the backward alone, after an untimed forward
                o = run_fwd()
                t0 = time.perf_counter()
                run_bwd(o)
                times.append(time.perf_counter() - t0)
            bwd = statistics.median(times)
            piece.zero_grad(set_to_none=True)
        n_params = sum(p.numel() for p in piece.parameters())
        costs.append(BlockCost(fwd, bwd, wire_bytes(out) if i < num_blocks(model) - 1 else 0, saved.total,
                               n_params))
        args = tuple(o.detach() for o in outs)
    return costs


def profile_frozen(name: str, fn: Callable[[], object], timer: str = "flops", hardware: Hardware | None = None,
                   reps: int = 5, params: int = 0, consumer: str = "first") -> FrozenCost:
    """Cost of one micro-batch of frozen work ``fn()`` (under ``no_grad``); its result's bytes are what must
    reach the consumer segment."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        if timer == "flops":
            with FlopCounterMode(display=False) as fc:
                out = fn()
            sec = fc.get_total_flops() / (hardware.peak_flops * hardware.mfu)
        else:
            out = fn()
            sec = _wall(fn, reps)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    nbytes = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
    return FrozenCost(name, sec, nbytes, params, consumer)
