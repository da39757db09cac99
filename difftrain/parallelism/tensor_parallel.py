"""Tensor parallelism for the DiT trunk with DTensor (``parallel.tp``): Megatron-LM's split of a transformer block
(Shoeybi et al. 2019, "Megatron-LM", Sec. 3, Fig. 3), written with ``torch.distributed.tensor.parallel``:

- **attention**: heads column-wise (each tp rank computes ``num_heads / tp`` heads: its rows of q, k and v), the
  output projection row-wise (one all-reduce of the block's attention output);
- **cross-attention**: the same (q and the fused k, v column-wise over heads, the projection row-wise);
- **MLP**: ``fc1`` column-wise, ``fc2`` row-wise (one all-reduce);
- **adaLN-Zero modulation** (``[D, 6D]`` per block, DiT's largest layer): column-wise, its small ``[B, 6D]`` output
  all-gathered;

so each block costs two all-reduces of ``[B, N, D]`` forward (and two backward, where the replicated inputs' grads
meet). The embedders and the final layer stay whole on every tp rank (small, and outside the trunk).

**Fused projections.** ``attn.qkv`` holds the rows q, k, v one after the other (the checkpoint layout, split by the
diffusers export), so a plain column split would give rank 0 all of q and half of k. Its parameters are DTensors
placed ``_StridedShard(0, split_factor=3)``: each rank holds its heads' rows of each of q, k and v, ``[q_r; k_r;
v_r]``, the layout the attention's ``view(B, N, 3, -1, hd)`` reads. DTensor's matmul rule does not follow that
placement (it would regather the weight), so :class:`FusedColwiseParallel` computes on the local rows itself, with
the input marked replicated and its gradient partial (Megatron's "f" operator: identity forward, all-reduce
backward). DCP cannot write strided shards, so checkpoints hold those tensors whole (:func:`savable`); every other
TP tensor is a plain ``Shard`` and reshards between tp sizes through DCP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

from difftrain.config import ConfigError


# the block's linears tp_plan splits (names under ``blocks.I.``): by output rows (column-parallel: weight and bias
# split) and by input columns (row-parallel: weight split, bias whole); the planner's bytes (memory.py) read these
COLUMN_PARALLEL = ("attn.qkv", "cross_attn.q", "cross_attn.kv", "mlp.fc1", "adaLN.1")
ROW_PARALLEL = ("attn.proj", "cross_attn.proj", "mlp.fc2")


class FusedColwiseParallel(ParallelStyle):
    """A Linear whose output rows are ``parts`` blocks (q, k, v) split column-wise block by block: rank r holds rows
    ``r/tp`` of each block, placed ``_StridedShard(0, parts)``; the forward returns this rank's ``[B, ..., out/tp]``
    (the blocks' local rows, in block order) as a plain tensor."""

    def __init__(self, parts: int, input_layout=None):
        super().__init__()
        self.parts = parts
        self.input_layout = input_layout or Replicate()  # Shard(1): sequence-parallel tokens, gathered first

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"FusedColwiseParallel needs an nn.Linear, got {type(module).__name__}")
        for name, p in list(module.named_parameters(recurse=False)):
            placed = distribute_tensor(p.detach(), device_mesh, [_StridedShard(0, split_factor=self.parts)])
            module.register_parameter(name, nn.Parameter(placed, requires_grad=p.requires_grad))
        mesh, layout = device_mesh, self.input_layout

        def forward(x: torch.Tensor) -> torch.Tensor:
            # replicated input: identity forward, backward all-reduces its gradient (each rank's heads contribute a
            # part); sequence-parallel input: all-gathered, its gradient reduce-scattered
            x = DTensor.from_local(x, mesh, [layout], run_check=False).redistribute(mesh, [Replicate()])
            x = x.to_local(grad_placements=[Partial()])
            w, b = module.weight, module.bias
            return F.linear(x, w.to_local() if isinstance(w, DTensor) else w,
                            b.to_local() if isinstance(b, DTensor) else b)

        module.forward = forward
        return module


def tp_plan(block: nn.Module, impl: str = "dtensor", sp: bool = False) -> dict[str, ParallelStyle]:
    """The block's submodule FQN -> style (attention, cross-attention, MLP, adaLN-Zero modulation); ``impl``
    megatron: megatron-core's functions on the same shards (``tensor_parallel_megatron.py``); ``sp``: the tokens
    arrive and leave sequence-sharded (gathered before each column split, reduce-scattered after each row split)."""
    from difftrain.models.dit import CrossAttention, Mlp, SelfAttention

    if impl == "megatron":
        from difftrain.parallelism.tensor_parallel_megatron import MegatronColumn, MegatronRow

        col, fused, row, gathered = MegatronColumn, MegatronColumn, MegatronRow, lambda: MegatronColumn(gather=True)
        tokens_fused = fused
    else:
        seq = Shard(1) if sp else Replicate()
        col = lambda: ColwiseParallel(input_layouts=seq)  # noqa: E731 (tokens in)
        row = lambda: RowwiseParallel(output_layouts=seq)  # noqa: E731 (tokens out)
        fused = FusedColwiseParallel  # the text (cross-attention k, v): replicated
        tokens_fused = lambda parts: FusedColwiseParallel(parts, seq)  # noqa: E731
        gathered = lambda: ColwiseParallel(output_layouts=Replicate())  # noqa: E731
    plan: dict[str, ParallelStyle] = {}
    for name, m in block.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, SelfAttention):
            plan |= {f"{pre}qkv": tokens_fused(3), f"{pre}proj": row()}
        elif isinstance(m, CrossAttention):
            plan |= {f"{pre}q": col(), f"{pre}kv": fused(2), f"{pre}proj": row()}
        elif isinstance(m, Mlp):
            plan |= {f"{pre}fc1": col(), f"{pre}fc2": row()}
    if getattr(block, "adaLN", None) is not None:  # [B, 6D]: the gather is tiny next to the [D, 6D] weight it splits
        plan["adaLN.1"] = gathered()
    return plan


def check_tp(model: nn.Module, tp: int) -> None:
    """One line naming the config key when the model (or a pipeline segment of it) cannot be split ``tp`` ways."""
    from difftrain.models.dit import Mlp, SelfAttention

    attn = [m for m in model.modules() if isinstance(m, SelfAttention)]
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    if not attn or not hasattr(model, "blocks"):
        raise ConfigError(f"config key 'parallel.tp' = {tp}: tensor parallelism splits a DiT's heads and MLP; "
                          f"{type(model).__name__} is not a DiT")
    for key, value in (("num_heads", attn[0].heads), ("mlp_ratio * hidden_size", mlps[0].fc1.out_features)):
        if value % tp:
            raise ConfigError(f"config key 'parallel.tp' = {tp} must divide model.args.{key} = {value}")
    adapted = [n for n, m in model.named_modules() if type(m).__module__.split(".")[0] in ("peft", "torchao")
               or type(m).__name__.startswith(("Lora", "Quant", "Fake"))]
    if adapted:
        raise ConfigError(f"config key 'parallel.tp' = {tp}: the model is adapted ({adapted[0]}); tensor parallelism "
                          "splits plain Linear layers only (LoRA, QAT: use tp 1)")


def apply_tp(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, impl: str = "dtensor",
             sp: bool = False) -> None:
    """Split each trunk block (``blocks``: ``parallelize.trunk_blocks``) over the 1-D ``mesh`` (the tp ranks of this
    rank's data-parallel slice), in place; parameter names are unchanged. ``sp``: sequence parallelism
    (:func:`apply_sp`)."""
    check_tp(model, mesh.size())
    for block in blocks:
        parallelize_module(block, mesh, tp_plan(block, impl, sp))
    if sp:
        apply_sp(model, blocks, mesh)


def _sharded_tokens(mesh: DeviceMesh):
    def to_shards(module, args):  # the trunk's input: this rank's tokens; backward all-gathers the gradient
        x = args[0]
        if x.shape[1] % mesh.size():
            raise ConfigError(f"config key 'parallel.sp': {x.shape[1]} tokens do not split over tp = {mesh.size()}")
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        return (x, *args[1:])
    return to_shards


def _whole_tokens(mesh: DeviceMesh):
    def gather(module, args, out):  # the trunk's output, whole again for the final layer (replicated)
        return DTensor.from_local(out, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    return gather


def _summed_modulation(block: nn.Module, mesh: DeviceMesh):
    """The block's modulation [B, 6, D] is the same on every tp rank but scales only this rank's tokens: its
    gradient is a partial sum, all-reduced here (Megatron's "f"; what its sequence-parallel norm weights get)."""
    mod_params = block.mod_params

    def summed(mod: torch.Tensor) -> torch.Tensor:
        out = mod_params(mod)
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    return summed


def apply_sp(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh) -> None:
    """Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", Sec. 4.2.2): the trunk's tokens are split over tp before the first block and gathered after the last,
    so LayerNorm, modulation, gates and residuals run on 1/tp of the tokens; inside, the column splits all-gather
    the tokens and the row splits reduce-scatter them (``tp_plan(sp=True)``). The image DiT only (a video DiT
    reshapes its tokens by frame inside a block)."""
    if getattr(model.config, "frames", 0) or getattr(model, "control", None) is not None:
        raise ConfigError("config key 'parallel.sp': sequence parallelism splits an image DiT's tokens; not a video "
                          "DiT or a ControlNet branch (use sp false)")
    for block in blocks:
        block.mod_params = _summed_modulation(block, mesh)
    blocks[0].register_forward_pre_hook(_sharded_tokens(mesh))
    blocks[-1].register_forward_hook(_whole_tokens(mesh))


def strided(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor) and any(isinstance(p, _StridedShard) for p in t.placements)


def _split(t: DTensor):
    """(tp placement, tp mesh, [(mesh dim, placement)] of the data-parallel dims) of a TP tensor, which FSDP2 may
    have sharded again on dim 0 over the dims before ``tp``."""
    names = t.device_mesh.mesh_dim_names
    tp = names.index("tp")
    return t.placements[tp], t.device_mesh["tp"], [(n, p) for n, p in zip(names, t.placements) if n != "tp"]


def _tp_local_shape(t: DTensor, tp_size: int) -> torch.Size:
    shape = list(t.shape)
    shape[0] //= tp_size  # FusedColwiseParallel splits dim 0 evenly (check_tp: tp divides the heads)
    return torch.Size(shape)


@torch.no_grad()
def whole(t: DTensor) -> torch.Tensor:
    """The whole tensor of a strided TP DTensor (collective). Under FSDP2 its placements nest (FSDP's dim-0 chunks of
    this rank's q/k/v rows): the data-parallel dims are gathered as plain dim-0 chunks, then the tp dim as strided
    rows, which is how the shards were cut (DTensor's own full_tensor does not invert the nesting)."""
    tp_placement, tp_mesh, dp = _split(t)
    local = t.to_local()
    tp_shape = _tp_local_shape(t, tp_mesh.size())
    for name, p in dp:
        if p.is_replicate():
            continue
        local = DTensor.from_local(local, t.device_mesh[name], [Shard(0)], run_check=False, shape=tp_shape,
                                   stride=torch.empty(tp_shape).stride()).full_tensor()
    return DTensor.from_local(local.contiguous(), tp_mesh, [tp_placement], run_check=False, shape=t.shape,
                              stride=t.stride()).full_tensor()


@torch.no_grad()
def shard_of(t: DTensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's local shard of ``full`` as ``t`` holds it (the inverse of :func:`whole`)."""
    tp_placement, tp_mesh, dp = _split(t)
    local = distribute_tensor(full, tp_mesh, [tp_placement]).to_local()
    for name, p in dp:
        if not p.is_replicate():
            local = distribute_tensor(local, t.device_mesh[name], [Shard(0)]).to_local()
    return local


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Any tensor whole: a DTensor gathered (collective), strided TP ones by :func:`whole`."""
    if not isinstance(t, DTensor):
        return t
    return whole(t) if strided(t) else t.full_tensor()


def savable(tree):
    """``tree`` (nested dicts of tensors) with strided DTensors made whole (DCP writes none; collective). Other
    DTensors are left as they are for DCP to write shard by shard."""
    if isinstance(tree, dict):
        return {k: savable(v) for k, v in tree.items()}
    return whole(tree) if strided(tree) else tree


@torch.no_grad()
def load_whole_into(live, loaded):
    """After a DCP load into :func:`savable`'s templates: each whole tensor's shard copied into the strided DTensor
    it stands for; returns ``loaded`` with those DTensors in the whole tensors' places."""
    if isinstance(live, dict):
        return {k: load_whole_into(v, loaded[k]) if k in loaded else v for k, v in live.items()} | \
            {k: v for k, v in loaded.items() if k not in live}
    if strided(live) and loaded is not live:
        live.to_local().copy_(shard_of(live, loaded))
        return live
    return loaded
