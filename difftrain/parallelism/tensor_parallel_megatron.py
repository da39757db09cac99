"""``parallel.tp_impl=megatron``: the same split as ``tensor_parallel.py`` (the same DTensor parameters, placements
and checkpoints, so a run may switch implementation on resume), computed with megatron-core's tensor-parallel
functions instead of DTensor's redistributions:

- column-parallel: ``linear_with_grad_accumulation_and_async_allreduce`` with ``allreduce_dgrad`` (megatron-core
  ``tensor_parallel/layers.py``, what its ``ColumnParallelLinear`` calls): the input's gradient is all-reduced over
  the tp group **asynchronously, overlapped with the weight-gradient matmul** (on CUDA; on CPU gloo it runs, without
  the overlap), and with ``gradient_accumulation_fusion`` where Transformer Engine or apex provide the fused wgrad
  kernel (a ``main_grad`` buffer: not used here, our optimizer reads ``.grad``);
- row-parallel: the local matmul, then ``reduce_from_tensor_model_parallel_region`` (forward all-reduce, identity
  backward), then the bias, as its ``RowParallelLinear`` does;
- a gathered column output (adaLN-Zero's ``[B, 6D]``): gathered by DTensor (megatron-core's
  ``gather_from_tensor_model_parallel_region`` allocates on ``torch.cuda.current_device()``, so it cannot run on CPU).

megatron-core's own layer classes are not used: they hold plain local tensors, which our engine's checkpoints (DCP,
resharding by name across tp sizes) and FSDP2 would see as replicated. Its functions take our tp mesh's group, so
``megatron.core.parallel_state`` is never initialised. Tested equal to the DTensor implementation and to one process
(tests/distributed/test_equivalence.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _place(module: nn.Module, mesh: DeviceMesh, placements: dict) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        placed = distribute_tensor(p.detach(), mesh, [placements[name]])
        module.register_parameter(name, nn.Parameter(placed, requires_grad=p.requires_grad))


class MegatronColumn(ParallelStyle):
    """Output rows split over tp (``parts`` > 1: block by block, as ``FusedColwiseParallel``); ``gather``: the
    output all-gathered (else this rank's columns, a plain tensor)."""

    def __init__(self, parts: int = 1, gather: bool = False):
        super().__init__()
        self.parts, self.gather = parts, gather

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

        placement = _StridedShard(0, split_factor=self.parts) if self.parts > 1 else Shard(0)
        _place(module, device_mesh, {"weight": placement, "bias": placement})
        mesh, group, gather = device_mesh, device_mesh.get_group(), self.gather

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = linear_with_grad_accumulation_and_async_allreduce(
                x, _local(module.weight), _local(module.bias), gradient_accumulation_fusion=False,
                allreduce_dgrad=True, sequence_parallel=False, tp_group=group)
            if not gather:
                return out
            return DTensor.from_local(out, mesh, [Shard(-1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()

        module.forward = forward
        return module


class MegatronRow(ParallelStyle):
    """Input columns split over tp (the previous column-parallel layer's output), the output all-reduced."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        _place(module, device_mesh, {"weight": Shard(1), "bias": Replicate()})
        group = device_mesh.get_group()

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = reduce_from_tensor_model_parallel_region(F.linear(x, _local(module.weight)), group=group)
            return out + _local(module.bias) if module.bias is not None else out

        module.forward = forward
        return module
