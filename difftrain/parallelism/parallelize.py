"""Apply parallelism to a single-device model from outside, in torchtitan's order:
TP (``tensor_parallel.py``) -> activation checkpointing -> compile -> FSDP2 | DDP.

Every function keeps parameter names (FQNs) unchanged except DDP's ``module.`` wrapper, which the
engine and DCP's state-dict helpers see through, so checkpoints move between engines and world sizes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from difftrain.config import ParallelConfig
from difftrain.parallelism.dims import Meshes
from difftrain.parallelism.tensor_parallel import apply_tp


def trunk_blocks(model: nn.Module) -> list[nn.Module]:
    """The trunk's blocks (a pipeline segment's: the ones it owns)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} exposes no .blocks trunk to parallelize")
    return [b for b in blocks if b is not None]


def _checkpointed(forward):
    def run(*args, **kwargs):  # any call signature and return type (UNet blocks take kwargs, return tuples)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each trunk block in backward. Replaces the instance's forward (names unchanged).

    The replacement is a plain Python function, not ``functools.partial(checkpoint, ...)``: a compiled block
    starts tracing at its ``forward``, and a partial would enter ``checkpoint`` (which disables Dynamo) directly,
    so the block would silently run uncompiled. Through a Python frame Dynamo sees the ``checkpoint`` call and
    compiles it as one recomputed region."""
    for block in trunk_blocks(model):
        block.forward = _checkpointed(block.forward)


def apply_compile(model: nn.Module, backend) -> None:
    """Compile block by block (one graph per block type, reused; names unchanged). ``backend``: a
    ``torch.compile`` backend name ("inductor", "aot_eager", ...) or callable."""
    for block in trunk_blocks(model):
        block.compile(backend=backend, dynamic=False)


def apply_fsdp2(model: nn.Module, meshes: Meshes, device: torch.device | None = None) -> nn.Module:
    """fully_shard each trunk block, then the root (FSDP over dp_shard, HSDP when dp_replicate > 1); the blocks
    are already on ``device``."""
    mesh = meshes.fsdp
    for block in trunk_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_ddp(model: nn.Module, meshes: Meshes, device: torch.device) -> nn.Module:
    return DistributedDataParallel(
        model,
        process_group=meshes.dp.get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def _no_wrapper(model: nn.Module, meshes: Meshes, device: torch.device) -> nn.Module:
    return model


Wrap = Callable[[nn.Module, Meshes, torch.device], nn.Module]
ENGINES: dict[str, Wrap] = {"ddp": apply_ddp, "fsdp2": apply_fsdp2}  # parallel.engine -> data parallelism
# pipeline segments: no DDP wrapper (its reducer cannot follow a schedule's many forwards before one synchronising
# backward, so the pipeline all-reduces the gradients after the schedule); FSDP2 shards them as usual
SEGMENT_ENGINES: dict[str, Wrap] = {**ENGINES, "ddp": _no_wrapper}


def parallelize(model: nn.Module, meshes: Meshes, pcfg: ParallelConfig, device: torch.device,
                ddp: bool = True) -> nn.Module:
    """Returns the module to call for forward (the DDP wrapper, or the same sharded module). ``ddp=False``: a
    pipeline segment (``SEGMENT_ENGINES``: no DDP wrapper)."""
    if pcfg.tp > 1:
        apply_tp(model, trunk_blocks(model), meshes.tp, pcfg.tp_impl, pcfg.sp)
    if pcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if pcfg.compile:
        apply_compile(model, pcfg.compile_backend)
    return (ENGINES if ddp else SEGMENT_ENGINES)[pcfg.engine](model, meshes, device)
