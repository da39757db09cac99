"""Per-rank bytes of the training state each engine holds: parameters, gradients, optimizer state and the EMA, predicted
from the trained parameters' shapes (no model run, works on meta).

The counts follow ZeRO's model-state analysis (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", sec. 5.1: ``(2 + 2 + K) Psi`` replicated, ``2 Psi + 2 Psi + K Psi / N`` under P_os,
``2 Psi + (2 + K) Psi / N`` under P_os+g, ``(2 + 2 + K) Psi / N`` under P_os+g+p), with the bytes difftrain holds:
fp32 weights and gradients (bf16 is an autocast of the compute, not of the stored weights), AdamW's two fp32
moments (8 bytes) plus its fp32 step count per optimizer tensor, and an fp32 EMA of what the rank holds of each
parameter. Where the implementations store more than the paper's formula, the prediction follows them:

* **FSDP2** (``fully_shard``) shards each parameter along dim 0 into ``ceil(d0 / N)`` rows per rank, padded, so every
  rank holds the padded shard of the parameter, its gradient, both moments and the EMA.
* **DeepSpeed ZeRO** keeps, besides AdamW's moments of this rank's partition, a cloned fp32 master copy of it, also in
  an fp32 run (``stage_1_and_2.py`` ``single_partition_of_fp32_groups``; ``stage3.py``
  ``fp32_partitioned_groups_flat``: DeepSpeed 0.19's branch that would reuse the fp32 partition compares a
  ``torch.device`` with a device-name string, unequal in torch 2.14, so it copies): the paper's K = 12 bytes per
  partitioned parameter, counted as optimizer state. Gradients at the end of the backward are this rank's partition
  under every stage: ZeRO-2/3 reduce bucket by bucket during the backward, ZeRO-1 reduces at the accumulation boundary
  inside the last backward (whole gradients exist until then). ZeRO-1/2 keep the module's parameters whole in one flat
  buffer (aligned to a multiple of ``2 N`` elements); ZeRO-3 keeps a ``ceil(numel / N)`` partition of each parameter
  (``ds_tensor``), and parameters with at most ``persistence_threshold`` elements
  (``stage3_param_persistence_threshold``) whole as well.
* **Offload** (ZeRO-Offload, Ren et al. 2021, sec. 4): ``offload_optimizer`` puts the master partition, both moments
  and the gradient partition in host memory (0 on the device); ZeRO-3 holds the reduced partition there twice (its
  ``grad_partitions_flat_buffer``, pinned host memory under offload, and the fp32 copy the CPU optimizer steps,
  ``fp32_partitioned_groups_flat[i].grad``); ``offload_params`` (ZeRO-3) moves the parameter partitions too.
* **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019, sec. 3), split as ``parallelism/tensor_parallel.py``
  splits a DiT block: the self- and cross-attention's q/k/v projections, the MLP's fc1 and the block's adaLN-Zero
  modulation are column-parallel (weight rows and bias split over ``tp``), the output projections and fc2
  row-parallel (weight columns split, bias whole); the embedders and the final layer are whole on every tp rank.
  TP composes with FSDP2, which then shards each rank's TP piece over the data-parallel ranks.

Communication buffers (DDP's gradient buckets, DeepSpeed's reduce buckets) are not model state and are left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from difftrain.parallelism.tensor_parallel import COLUMN_PARALLEL, ROW_PARALLEL


WEIGHT, GRAD, MOMENTS, STEP = 4, 4, 8, 4  # bytes per element: fp32 weight, fp32 grad, AdamW's m and v; step tensor


@dataclass(frozen=True)
class EngineCase:
    """One way to train the same model: what ``parallel.*`` keys select."""
    name: str
    engine: str  # ddp | fsdp2 | deepspeed
    zero_stage: int = 0
    tp: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False

    def overrides(self) -> list[str]:
        """The run config's ``parallel.*`` overrides for this case."""
        out = [f"parallel.engine={self.engine}"]
        if self.engine == "deepspeed":
            out.append(f"parallel.zero_stage={self.zero_stage}")
        if self.offload_optimizer:
            out.append("parallel.zero_offload_optimizer=true")
        if self.offload_params:
            out.append("parallel.zero_offload_params=true")
        if self.tp > 1:
            out.append(f"parallel.tp={self.tp}")
        return out


CASES = (EngineCase("ddp", "ddp"), EngineCase("fsdp2", "fsdp2"),
         EngineCase("zero1", "deepspeed", 1), EngineCase("zero2", "deepspeed", 2), EngineCase("zero3", "deepspeed", 3),
         EngineCase("zero2_offload", "deepspeed", 2, offload_optimizer=True),
         EngineCase("zero3_offload", "deepspeed", 3, offload_optimizer=True, offload_params=True),
         EngineCase("tp2", "fsdp2", tp=2))


@dataclass
class RankBytes:
    """Bytes one rank holds on its device (and in host memory, offloaded)."""
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    host: dict = field(default_factory=dict)  # category -> bytes moved to host memory

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema

    def with_host(self) -> dict[str, float]:
        """Each category wherever it lives (a CPU run holds device and host state in the same memory)."""
        return {k: getattr(self, k) + self.host.get(k, 0.0) for k in ("params", "grads", "optimizer", "ema")}


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The trained parameters' shapes by name (a meta model is enough)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def tp_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of the piece of parameter ``name`` one of ``tp`` tensor-parallel ranks holds."""
    module, _, kind = name.rpartition(".")
    if tp == 1 or not name.startswith("blocks."):
        return shape
    if module.endswith(COLUMN_PARALLEL):
        return (shape[0] // tp, *shape[1:])
    if module.endswith(ROW_PARALLEL) and kind == "weight":
        return (shape[0], shape[1] // tp, *shape[2:])
    return shape


def predict(shapes: dict[str, tuple[int, ...]], case: EngineCase, world: int,
            persistence_threshold: int = 100000) -> RankBytes:
    """The bytes one of ``world`` ranks holds under ``case`` (data-parallel size ``world // case.tp``)."""
    N = world // case.tp
    pieces = [tp_shape(n, s, case.tp) for n, s in shapes.items()]
    numels = [math.prod(s) for s in pieces]
    psi, n_tensors = sum(numels), len(numels)
    out = RankBytes()
    if case.engine == "fsdp2":
        local = sum(math.ceil(s[0] / N) * math.prod(s[1:]) if s else 1 for s in pieces)
        out.params, out.grads, out.ema = WEIGHT * local, GRAD * local, WEIGHT * local
        out.optimizer = MOMENTS * local + STEP * n_tensors
    elif case.engine == "deepspeed":
        if case.zero_stage == 3:
            part = sum(math.ceil(n / N) for n in numels)
            # kept gathered on every rank beside their partition (the same tensor on a single rank)
            whole = sum(n for n in numels if n <= persistence_threshold) if N > 1 else 0
            out.params, out.ema = WEIGHT * (part + whole), WEIGHT * part
            if case.offload_params:
                out.host["params"], out.params = WEIGHT * part, WEIGHT * whole
        else:
            flat = psi + (-psi) % (2 * N)  # the flat buffer, aligned so that every partition has the same size
            part = flat // N
            out.params, out.ema = WEIGHT * flat, WEIGHT * psi
        out.grads = GRAD * part
        out.optimizer = (WEIGHT + MOMENTS) * part + STEP  # the fp32 master partition (a copy) and both moments
        if case.offload_optimizer:  # ZeRO-3 keeps two host copies of the gradient partition (module docstring)
            out.host["grads"] = out.grads * (2 if case.zero_stage == 3 else 1)
            out.host["optimizer"] = out.optimizer
            out.grads = out.optimizer = 0.0
    else:  # ddp: the whole model on every rank
        out.params, out.grads, out.ema = WEIGHT * psi, GRAD * psi, WEIGHT * psi
        out.optimizer = MOMENTS * psi + STEP * n_tensors
    return out


def memory_table(shapes: dict[str, tuple[int, ...]], world: int, cases=CASES, budget: float | None = None,
                 persistence_threshold: int = 100000) -> list[str]:
    """Markdown rows of :func:`predict` per case: GB per rank on the device (and on the host), whether it fits
    ``budget`` bytes of model state."""
    lines = ["| engine | params GB | grads GB | optimizer GB | EMA GB | device total GB | host GB |"
             + (" fits |" if budget else ""), "|---|---|---|---|---|---|---|" + ("---|" if budget else "")]
    for c in cases:
        if world % c.tp:
            continue
        b = predict(shapes, c, world, persistence_threshold)
        fits = f" {'yes' if b.total <= budget else 'no'} |" if budget else ""
        lines.append(f"| {c.name} | {b.params / 1e9:.2f} | {b.grads / 1e9:.2f} | {b.optimizer / 1e9:.2f} | "
                     f"{b.ema / 1e9:.2f} | {b.total / 1e9:.2f} | {sum(b.host.values()) / 1e9:.2f} |{fits}")
    return lines


# ------------------------------------------------------------------------------------------------ counted
def _storage_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind ``tensors`` (DTensors: their local shard) not in ``seen``, which they join: a
    view of a flat buffer counts the whole buffer, once."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        s = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _tensors(x):
    """The tensors in a nest of dicts, lists and tuples."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def held_bytes(engine) -> dict[str, int]:
    """What :func:`predict` predicts, counted from the tensors a live engine (``train/engine.py`` TorchEngine,
    ``train/deepspeed_engine.py`` DeepSpeedEngine) holds on this rank: parameters, gradients (call it between the
    backward and the step), optimizer state, EMA; each storage once, in that order. DeepSpeed's are read from its
    optimizer's attributes (0.19): the flat buffers and ``ds_tensor`` partitions, the reduced gradient partitions and
    the fp32 master partitions (their ``.grad``: the offloaded gradients)."""
    seen: set = set()
    out = {}
    ds = getattr(engine, "ds", None)
    if ds is None:
        params = list(engine.params)
        out["params"] = _storage_bytes(params, seen)
        out["grads"] = _storage_bytes([p.grad for p in params], seen)
        out["optimizer"] = _storage_bytes(_tensors(list(engine.optimizer.state.values())), seen)
    else:
        opt, params = engine.optimizer, list(engine.module.parameters())
        if engine.stage == 3:
            held = [p.ds_tensor for p in params] + [p.data for p in params if p.data.numel() == p.ds_numel]
            grads = [p.grad for p in params] + [opt.grad_partitions_flat_buffer]
            master = list(opt.fp32_partitioned_groups_flat)
        else:
            held = [p.data for p in params]
            grads = [p.grad for p in params] + list(_tensors(opt.averaged_gradients))
            master = list(opt.single_partition_of_fp32_groups)
        out["params"] = _storage_bytes(held, seen)
        out["grads"] = _storage_bytes(grads + [m.grad for m in master], seen)
        out["optimizer"] = _storage_bytes([*_tensors(list(opt.optimizer.state.values())), *master], seen)
    out["ema"] = _storage_bytes(engine.ema.shadow.values(), seen)
    return out
