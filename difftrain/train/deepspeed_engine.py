"""The DeepSpeed ZeRO engine (``parallel.engine=deepspeed``, ``parallel.zero_stage`` 1, 2 or 3): the same Trainer loop
and stages as :class:`~difftrain.train.engine.TorchEngine`, with DeepSpeed's partitioned optimizer (ZeRO-1),
gradients (ZeRO-2) and parameters (ZeRO-3) (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", section 5), its gradient accumulation and its gradient clipping.

- **Config.** ``deepspeed.initialize`` gets a config built from ours: the per-rank micro-batch
  (``data.batch_size / (dp * optim.grad_accum)``), ``optim.grad_accum`` as its accumulation steps (our trainer marks
  the last micro-batch with ``set_gradient_accumulation_boundary`` and calls ``step`` once), ``optim.grad_clip`` as
  ``gradient_clipping``, fp32 (no fp16/bf16 section), the ZeRO stage and, under ZeRO-3,
  ``parallel.zero_persistence_threshold`` (DeepSpeed's ``stage3_param_persistence_threshold``: parameters with fewer
  elements stay whole on every rank, as DeepSpeed does by default below 1e5). The optimizer is torch's AdamW over the
  trainable parameters only (a client optimizer; ``zero_allow_untested_optimizer``), its learning rate written into
  DeepSpeed's param groups before each step from our table indexed by applied updates (``train/engine.py``
  ``lr_table``); DeepSpeed's own scheduler is not used.
- **CPU offload** (ZeRO-Offload, Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training").
  ``parallel.zero_offload_optimizer`` (ZeRO 1-3: DeepSpeed's ``offload_optimizer: {device: cpu}``) keeps the fp32
  master partitions, their gradients and the AdamW moments in host memory and steps them there;
  ``parallel.zero_offload_params`` (ZeRO-3 only: ``offload_param``) keeps the parameter partitions there too, so the
  EMA's partitions (``p.ds_tensor``'s device) live in host memory as well. The optimizer is then DeepSpeed's
  ``DeepSpeedCPUAdam(adamw_mode=True)`` (its C++ op, compiled by ninja on first use), what DeepSpeed users get with
  offload, rather than torch's AdamW over host tensors: the same update (decoupled decay ``p *= 1 - lr * wd``, then
  ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``), vectorised, so it differs from torch's by fp32
  rounding only (a few ulps per step; the tests hold it to DDP within 1e-5). Its step count is an int, not a tensor.
- **Skipped steps.** DeepSpeed's ZeRO optimizers skip a step whose global grad norm is not finite, on every rank
  (``stage_1_and_2.py`` / ``stage3.py`` ``step``: the norm is all-reduced, then the step returns after clearing the
  gradients), also in fp32. A non-finite loss on any rank back-propagates non-finite gradients, whose all-reduced
  norm is then non-finite everywhere: the same rule as TorchEngine. ``was_step_applied()`` gives the flag, which
  gates the applied-update count, the learning rate and the EMA.
- **EMA.** Of the trainable parameters, over what each rank holds: the whole parameter under ZeRO-1/2 (replicated,
  as under DDP), this rank's flat partition ``p.ds_tensor`` under ZeRO-3 (1/world of it, no communication in the
  update). Swapping it in for sampling writes the partitions, and DeepSpeed's forward gathers them.
- **Checkpoints** go through our protocol (``train/checkpoint.py``: DCP, ``COMPLETE`` marker, the restricted
  reader), never ``DeepSpeedEngine.save_checkpoint`` (``torch.save``, a pickle). The tensors are whole, under
  TorchEngine's keys (``model.NAME.*``, ``optim.NAME.FQN.{step,exp_avg,exp_avg_sq}``, ``ema.NAME.*``), assembled
  parameter by parameter with DeepSpeed's ``safe_get_full_*`` / ``GatheredParameters`` and written back with
  ``safe_set_full_*``: a checkpoint is independent of the ZeRO stage, offload and world size, so export, ``sample``
  and a DDP/FSDP2 resume read it (tested: a 2-rank ZeRO-3 checkpoint resumed by 1 rank, offloaded and under DDP).
  The cost: each rank holds the whole state at a save (DCP writes it once).

Frozen modules (encoders, a teacher) stay outside DeepSpeed: plain modules on every rank, no optimizer state. One
trainable module per run (stages with several, or derived target networks under ZeRO-3, are refused in one line).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from difftrain.config import ConfigError, OptimConfig, ParallelConfig
from difftrain.launch.env import discover
from difftrain.parallelism.dims import Meshes
from difftrain.train.ema import lerp_shadow, warmup_decay
from difftrain.train.engine import ENGINES, Engine, all_finite, lr_table, spec_meta_copy

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def ds_config(pcfg: ParallelConfig, ocfg: OptimConfig, batch_size: int, dp: int) -> dict:
    """DeepSpeed's config from ours: batch split as our trainer splits it, clipping, ZeRO stage, CPU offload, fp32."""
    micro = batch_size // (dp * ocfg.grad_accum)
    zero = {"stage": pcfg.zero_stage}
    if pcfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = pcfg.zero_persistence_threshold
        # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear for the whole process, for good
        # ("This will persist unless manually reset"): it would reach the frozen modules, torchao's QAT and the later
        # stages of a campaign run in the same process, so it is off
        zero["memory_efficient_linear"] = False
    if pcfg.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if pcfg.zero_offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {"train_batch_size": micro * dp * ocfg.grad_accum, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": ocfg.grad_accum, "gradient_clipping": ocfg.grad_clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62, "wall_clock_breakdown": False}


class DeepSpeedEngine(Engine):
    """One trainable module under ``deepspeed.initialize`` (see the module docstring), frozen ones beside it."""

    def __init__(self, name: str, module: nn.Module, pcfg: ParallelConfig, ocfg: OptimConfig, device: torch.device,
                 total_steps: int, batch_size: int, dp: int):
        import deepspeed

        self.name, self.device, self.stage, self.offload = name, device, pcfg.zero_stage, pcfg.zero_offload_optimizer
        self.frozen: dict[str, nn.Module] = {}
        self.derived: dict[str, nn.Module] = {}
        self.base_keys: dict[str, set[str]] = {}
        self.lr_table = lr_table(ocfg, total_steps, torch.device("cpu"))
        self.updates = torch.zeros((), dtype=torch.long)  # applied updates (skipped steps excluded)
        module.to(device)
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        adamw = dict(lr=float(self.lr_table[0]), betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
        if self.offload:  # DeepSpeed's C++ AdamW over the host partitions (module docstring)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(list(self.params.values()), adamw_mode=True, **adamw)
        else:
            optimizer = torch.optim.AdamW(list(self.params.values()), **adamw)
        # DeepSpeed asserts LOCAL_RANK in the environment, which torchrun and its own launcher export: under srun,
        # MPICH or as a single process it is ours (launch/env.py)
        os.environ.setdefault("LOCAL_RANK", str(discover().local_rank))
        _forget_destroyed_world()
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config(pcfg, ocfg, batch_size, dp), dist_init_required=False)
        self._init_adam_state()
        self.modules = {name: module}
        self.models = {name: self.ds}
        self.decay = ocfg.ema_decay
        with torch.no_grad():
            self.ema = _EMA({f"{name}.{n}": self._held(p).clone() for n, p in self.params.items()})

    @torch.no_grad()
    def _init_adam_state(self) -> None:
        """AdamW's state of DeepSpeed's flat fp32 partitions as its first step would create it (step 0, zero
        moments), so that a resume has tensors to read into before any step (ZeRO-3 creates them lazily)."""
        inner = self.optimizer.optimizer
        flat = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3: its sub-groups' partitions
        step = 0 if self.offload else torch.tensor(0.0)  # DeepSpeedCPUAdam's C++ op takes an int
        for p in flat if flat is not None else [p for g in inner.param_groups for p in g["params"]]:
            if not inner.state.get(p):
                inner.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    @classmethod
    def from_stage(cls, specs: dict, meshes: Meshes, pcfg: ParallelConfig, ocfg: OptimConfig, device: torch.device,
                   total_steps: int, batch_size: int | None = None) -> "DeepSpeedEngine":
        from difftrain.train.stages.base import DERIVED, FROZEN, TRAINABLE

        trainable = [n for n, s in specs.items() if s.role == TRAINABLE]
        if len(trainable) != 1:
            raise ConfigError(f"config key 'parallel.engine' = deepspeed trains one module; this stage trains "
                              f"{len(trainable)} ({', '.join(trainable)}): use ddp or fsdp2")
        if pcfg.zero_stage == 3 and any(s.role == DERIVED for s in specs.values()):
            raise ConfigError("config key 'parallel.zero_stage' = 3: this stage's derived module (a target network) "
                              "copies partitioned weights, which is not built yet; use zero_stage 1 or 2")
        name = trainable[0]
        engine = cls(name, specs[name].init(device), pcfg, ocfg, device, total_steps,
                     batch_size or meshes.dims.dp * ocfg.grad_accum, meshes.dims.dp)
        for n, s in specs.items():
            if s.role == FROZEN:
                engine.frozen[n] = s.init(device).requires_grad_(False).eval()
            elif s.role == DERIVED:
                engine.derived[n] = spec_meta_copy(s, engine.modules[name], meshes, pcfg, device)
        return engine

    # -- where a parameter's values live on this rank --------------------------------------------------------
    def _held(self, p: nn.Parameter) -> torch.Tensor:
        """What this rank holds of ``p``: its flat partition under ZeRO-3, else the whole parameter."""
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    @torch.no_grad()
    def _set_held(self, p: nn.Parameter, part: torch.Tensor, full: torch.Tensor | None = None) -> None:
        """Write what this rank holds of ``p`` (``part``, its partition under ZeRO-3). A ZeRO-3 parameter kept whole
        on every rank (DeepSpeed's ``stage3_param_persistence_threshold``: small ones are never released) gets its
        whole value too: ``full``, or gathered from the partitions (collective; every rank keeps the same ones)."""
        held = self._held(p)
        held.copy_(part)
        if held is not p.data and p.data.numel() == p.ds_numel:
            p.data.copy_(full.view_as(p.data) if full is not None else self._full_of_partition(p, held))

    def _full_param(self, p: nn.Parameter) -> torch.Tensor:
        """The whole parameter (collective under ZeRO-3)."""
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.data.detach().clone()
        return p.detach().clone()

    def _full_of_partition(self, p: nn.Parameter, part: torch.Tensor) -> torch.Tensor:
        """The whole tensor whose ZeRO-3 flat partitions of ``p``'s layout the ranks hold as ``part`` (collective)."""
        if not hasattr(p, "ds_tensor"):
            return part.clone()
        part = part.to(self.device)  # offloaded partitions live in host memory; NCCL gathers device tensors
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)

    def _partition_of(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``full`` in ``p``'s ZeRO-3 partition layout (zero padding at the end)."""
        size = p.ds_tensor.numel()
        flat = torch.zeros(size * dist.get_world_size(), dtype=full.dtype, device=full.device)
        flat[:full.numel()] = full.reshape(-1)
        return flat.narrow(0, size * dist.get_rank(), size)

    # -- Engine ------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.ds

    @property
    def module(self) -> nn.Module:
        return self.modules[self.name]

    def live(self) -> dict[str, nn.Module]:
        return {**self.models, **self.frozen, **self.derived}

    def frozen_keys(self) -> dict[str, set[str]]:
        return {n: {k for k, p in m.named_parameters() if not p.requires_grad} for n, m in self.modules.items()}

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already divided by optim.grad_accum

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        self.ds.set_gradient_accumulation_boundary(last)
        yield

    def step(self, step: int, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._set_lr()
        self.ds.step()
        ok = torch.tensor(bool(self.ds.was_step_applied()))
        norm = self.ds.get_global_grad_norm()  # a float or a device tensor: kept as it is (no host sync)
        norm = torch.as_tensor(float("inf") if norm is None else norm, dtype=torch.float32)
        self.updates += ok
        self._set_lr()
        if ok:  # DeepSpeed's own flag, a host bool already
            with torch.no_grad():
                lerp_shadow(list(self.ema.shadow.values()), [self._held(p) for p in self.params.values()],
                      warmup_decay(self.decay, step), None)
        return norm.to(self.device), ok.to(self.device)

    def _set_lr(self) -> None:
        lr = float(self.lr_table[min(int(self.updates), len(self.lr_table) - 1)])
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def finite_state(self) -> bool:
        return all_finite([self._held(p) for p in self.params.values()] + list(self.ema.shadow.values()),
                          self.device)

    # -- checkpoint state: whole tensors under TorchEngine's keys ----------------------------------------------
    @torch.no_grad()
    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        module, base = self.module, self.base_keys.get(self.name, set())
        model = {f"{self.name}.{n}": self._full_param(p) for n, p in module.named_parameters() if n not in base}
        model.update({f"{self.name}.{n}": b.detach().clone() for n, b in module.named_buffers()})
        step = self._optim_step()
        optim = {f"{self.name}.{n}": {"step": step.clone(),
                                     **{k: safe_get_full_optimizer_state(p, k).reshape(p.ds_shape if hasattr(
                                         p, "ds_shape") else p.shape).clone() for k in _ADAM_KEYS}}
                 for n, p in self.params.items()}
        ema = {k: self._full_of_partition(p, self.ema.shadow[k])
               for k, p in zip(self.ema.shadow, self.params.values())}
        out = {"model": model, "optim": optim, "ema": ema}
        if self.derived:  # plain modules beside DeepSpeed (ZeRO-1/2): their live tensors, less the frozen base
            out["derived"] = {n: {k: v for k, v in m.state_dict().items() if k not in base}
                              for n, m in self.derived.items()}
        return out

    def _optim_step(self) -> torch.Tensor:
        """AdamW's step count of the flat partitions (one per param group, all equal: every step updates all)."""
        steps = [s["step"] for s in self.optimizer.optimizer.state.values() if "step" in s]
        return torch.as_tensor(steps[0], dtype=torch.float32).clone() if steps else torch.zeros((), dtype=torch.float32)

    @torch.no_grad()
    def load_state_dict(self, sd: dict, step: int, updates: int | None = None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        module, base = self.module, self.base_keys.get(self.name, set())
        for n, p in module.named_parameters():
            if n in base:
                continue
            full = sd["model"][f"{self.name}.{n}"]
            if p.requires_grad:
                safe_set_full_fp32_param(p, full)  # the optimizer's fp32 master partition
            self._set_held(p, self._partition_of(p, full) if hasattr(p, "ds_tensor") else full, full)
        for n, b in module.named_buffers():
            b.copy_(sd["model"][f"{self.name}.{n}"])
        for n, m in self.derived.items():
            m.load_state_dict(sd["derived"][n], strict=not base)
        saved_step = None
        for n, p in self.params.items():
            entry = sd["optim"][f"{self.name}.{n}"]
            for k in _ADAM_KEYS:
                safe_set_full_optimizer_state(p, entry[k], k)
            saved_step = entry["step"]
        if saved_step is not None:
            for s in self.optimizer.optimizer.state.values():
                if "step" in s:
                    s["step"] = torch.as_tensor(saved_step, dtype=torch.float32).clone() \
                        if torch.is_tensor(s["step"]) else int(saved_step)
        for k, p in zip(self.ema.shadow, self.params.values()):
            full = sd["ema"][k]
            self.ema.shadow[k].copy_(self._partition_of(p, full) if hasattr(p, "ds_tensor") else full)
        self.updates.fill_(updates if updates is not None else int(saved_step or 0))
        self._set_lr()

    @contextlib.contextmanager
    def ema_swapped_in(self):
        """The EMA in the held parameters (partitions under ZeRO-3, which DeepSpeed's forward gathers); all ranks."""
        params = list(self.params.values())
        backup = [self._held(p).clone() for p in params]
        for p, shadow in zip(params, self.ema.shadow.values()):
            self._set_held(p, shadow)
        try:
            yield
        finally:
            for p, b in zip(params, backup):
                self._set_held(p, b)


def _forget_destroyed_world() -> None:
    """DeepSpeed keeps its clone of the world group for the life of the process (``utils/groups.py``
    ``_WORLD_GROUP``); after the process group it was made in is destroyed (a second run in one process: in-process
    tests, a sweep), its collectives fail on the stale group. Forgotten here, DeepSpeed clones the current world."""
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is not None:
        try:
            dist.get_process_group_ranks(groups._WORLD_GROUP)
        except KeyError:  # not a group of the current world
            groups._WORLD_GROUP = None


class _EMA:
    """The EMA's tensors by checkpoint key (``NAME.FQN``): what this rank holds (see the module docstring)."""

    def __init__(self, shadow: dict[str, torch.Tensor]):
        self.shadow = shadow

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow


ENGINES["deepspeed"] = DeepSpeedEngine  # config key parallel.engine
