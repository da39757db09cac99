"""Engines own how a step is executed: the wrapped model, backward, optimizer, LR schedule, EMA and
the tensors that go into a checkpoint.

The Trainer only calls the ``Engine`` interface, so an engine that brings its own optimizer,
backward and checkpoint format (DeepSpeed, a later issue) plugs in without touching the loop.
``TorchEngine`` covers DDP and FSDP2 (optionally HSDP) on any device.

**Non-finite steps never reach the weights.** Each step every rank folds "is the global grad norm finite, and this
rank's loss" into one flag, all-reduced (MAX of "bad") over the whole world on the device, so every data-parallel
and pipeline rank takes the same decision without a host sync. A bad step is skipped as ``torch.amp.GradScaler``
skips one: the fused AdamW kernel reads ``optimizer.found_inf`` on the device and then leaves the parameters, both
moments and its step counter untouched (``torch/optim/adam.py``, ``_fused_adam``). The learning rate is a 0-dim
device tensor in the param group, set after each step from a table of the schedule indexed by the number of
*applied* updates, and the EMA's update weight is multiplied by the flag, so neither moves on a skipped step.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from difftrain.config import ConfigError, OptimConfig, ParallelConfig
from difftrain.errors import DifftrainError
from difftrain.parallelism.dims import Meshes
from difftrain.parallelism.parallelize import parallelize
from difftrain.parallelism.tensor_parallel import load_whole_into, savable
from difftrain.train import apex
from difftrain.train.ema import EMA, _local


class NonFiniteError(DifftrainError):
    """Too many consecutive non-finite steps, or non-finite weights at a checkpoint (nothing is written)."""


class Engine(ABC):
    model: nn.Module  # call this for forward (may be a wrapper)
    module: nn.Module  # the unwrapped model: parameter names, export, sampling

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch; gradients are synchronised only when ``last``."""

    @abstractmethod
    def step(self, step: int, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective. Clip, update, advance the LR schedule and EMA, unless the global grad norm or any rank's
        ``loss`` (this rank's loss of the step, a device tensor) is non-finite: then nothing changes on any rank.
        Returns the pre-clip grad norm and whether the step was applied (device tensors: no host sync)."""

    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the next update (a host sync: log steps only)."""

    @abstractmethod
    def finite_state(self) -> bool:
        """Collective, a host sync (checkpoint steps only): every rank's weights and EMA are finite."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Tensors only (nested dicts), for torch.distributed.checkpoint."""

    @abstractmethod
    def load_state_dict(self, sd: dict, step: int, updates: int | None = None) -> None:
        """Restore :meth:`state_dict`; ``updates``: the optimizer updates applied before the checkpoint (the train
        state's count; None for checkpoints from before it was kept)."""

    @abstractmethod
    def ema_swapped_in(self) -> contextlib.AbstractContextManager: ...


def lr_lambda(ocfg: OptimConfig, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant); the argument is the number of updates
    applied so far."""
    def f(step: int) -> float:
        if ocfg.warmup_steps and step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        if ocfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - ocfg.warmup_steps)
        progress = min(1.0, (step - ocfg.warmup_steps) / span)
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def lr_table(ocfg: OptimConfig, total_steps: int, device: torch.device) -> torch.Tensor:
    """``lr * lr_lambda(k)`` for ``k = 0 .. total_steps`` updates applied, on the device (float32, the fused
    optimizer's learning-rate type)."""
    f = lr_lambda(ocfg, total_steps)
    return torch.tensor([ocfg.lr * f(k) for k in range(max(total_steps, 0) + 1)], dtype=torch.float32, device=device)


@torch.no_grad()
def local_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Grad norm of these parameters over the data-parallel and tensor-parallel shards (DTensor norms reduce over
    their mesh). Under tensor parallelism the grads are of several kinds (plain, sharded on the tp mesh, on the 2-D
    (dp, tp) mesh; strided): each kind's norm is taken apart, then combined."""
    norms = []
    for kind, group in grad_kinds(params).items():
        grads = [p.grad for p in group]
        if kind is not None and any(isinstance(p, _StridedShard) for p in kind[1]):
            norms.append(_sharded_norm(grads))
            continue
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        return norms[0]
    return torch.stack([n.float() for n in norms]).square().sum().sqrt() if norms else torch.zeros(())


def grad_kinds(params: list[nn.Parameter]) -> dict:
    """The parameters that have a grad, by the grad's kind, (mesh, placements) or None for plain tensors: foreach
    ops take one kind at a time."""
    kinds: dict = {}
    for p in params:
        g = p.grad
        if g is not None:
            kinds.setdefault((g.device_mesh, g.placements) if isinstance(g, DTensor) else None, []).append(p)
    return kinds


def _sharded_norm(group: list) -> torch.Tensor:
    """The 2-norm of DTensors sharded (strided or not) on every dim they are placed on: local squares summed over the
    sharded mesh dims (DTensor's norm rule does not follow strided placements)."""
    mesh, placements = group[0].device_mesh, group[0].placements
    sq = torch.stack([g.to_local().float().square().sum() for g in group]).sum()
    for dim, p in enumerate(placements):
        if p.is_shard() or isinstance(p, _StridedShard):
            dist.all_reduce(sq, group=mesh.get_group(dim))
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, group=None) -> torch.Tensor:
    """Global grad norm (over the shards, and summed over ``group``'s ranks, e.g. the pipeline stages, each holding
    other parameters), then clip."""
    norm = local_grad_norm(params)
    if group is not None:
        sq = norm.square()
        dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
    if max_norm > 0:
        for group in grad_kinds(params).values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
    return norm


@torch.no_grad()
def agree_finite(norm: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Whether this step may be applied, the same on every rank: the grad norm and every rank's loss are finite.
    One 1-element all-reduce over the world, queued on the device (no host sync)."""
    bad = (~torch.isfinite(norm) | ~torch.isfinite(loss)).to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad[0] == 0


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every rank's ``tensors`` (the float ones: what this rank holds) are finite; collective, one host
    sync (an engine's ``finite_state``, at checkpoint steps only)."""
    local = [t for t in tensors if t.is_floating_point()]
    bad = (~torch.stack([t.isfinite().all() for t in local]).all() if local else torch.tensor(False))
    bad = bad.to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad[0])


@torch.no_grad()
def spec_meta_copy(spec, original: nn.Module, meshes: Meshes, pcfg: ParallelConfig, device: torch.device) -> nn.Module:
    """A derived module: ``spec.meta()`` sharded like ``original`` (FSDP2: the same blocks on the same mesh; DDP: no
    wrapper, it takes no gradient), materialised, then the original's parameters and buffers copied shard by shard,
    so it never exists whole on a rank that holds a shard."""
    from difftrain.parallelism.parallelize import apply_fsdp2

    module = spec.meta().requires_grad_(False)
    if pcfg.engine == "fsdp2":
        apply_fsdp2(module, meshes)
        module.set_reshard_after_forward(True)  # no backward follows its forwards: the root reshards too
    module.to_empty(device=device)
    mine = dict(module.named_parameters()) | dict(module.named_buffers())
    for n, t in [*original.named_parameters(), *original.named_buffers()]:
        _local(mine[n]).copy_(_local(t))
    return module.eval()


class TorchEngine(Engine):
    """DDP or FSDP2 with torch's fused AdamW, a learning-rate table indexed by applied updates and a (sharded)
    EMA; a step with a non-finite loss or gradient is skipped on every rank (see the module docstring).

    It trains the stage's trainable modules (by name: one AdamW over all of them, an EMA of each) and holds its
    frozen ones (no grad, no optimizer state): :meth:`from_stage`. AdamW's state is per parameter and it steps only
    parameters that got a gradient, so a stage that alternates its modules (DMD's generator and fake score) gives
    each its own moments and step counts: a module whose forward ran without grad in a step is left bitwise as it
    was (its grads are None after every step). Checkpoint tensors are keyed by module name
    (``model.NAME.*``, ``optim.NAME.*``, ``ema.NAME.*``), so a stage's modules resume and reshard by name."""

    norm_group = None  # ranks whose grad norms add up (the pipeline segments); None = this rank's parameters

    def __init__(self, modules: dict[str, nn.Module], meshes: Meshes, pcfg: ParallelConfig, ocfg: OptimConfig,
                 device: torch.device, total_steps: int, wrapped: bool | set = False):
        """``modules``: the trainable modules by name, materialised (or already parallelised: ``wrapped``, True or
        the names of those that are, as the pipeline's segments wrap themselves)."""
        self.modules = modules
        self.device = device
        self.kind = pcfg.engine
        self.tp = pcfg.tp > 1
        done = set(modules) if wrapped is True else set(wrapped or ())
        self.apex = apex.wanted(ocfg.impl, device)
        for n in set(modules) - done if self.apex else ():
            apex.fuse_norms(modules[n])
        self.models = {n: m if n in done else parallelize(m, meshes, pcfg, device) for n, m in modules.items()}
        self.container = nn.ModuleDict(self.models)  # one tree: parameter and state-dict names are NAME.*
        self.frozen: dict[str, nn.Module] = {}
        self.derived: dict[str, nn.Module] = {}
        self.derived_of: dict[str, str] = {}  # derived module -> the trainable module it copies
        self.base_keys: dict[str, set[str]] = {}  # per trainable module: the frozen base left out of checkpoints
        self.params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.max_norm = ocfg.grad_clip
        self.lr_table = lr_table(ocfg, total_steps, device)
        self.updates = torch.zeros((), dtype=torch.long, device=device)  # applied updates (skipped steps excluded)
        self.lr_t = self.lr_table[:1].clone().reshape(())  # the param group's lr, rewritten in place each step
        if self.apex:  # a float lr, set before each step (its kernels take no device tensor)
            self.optimizer = apex.fused_adamw(self.params, float(self.lr_t), tuple(ocfg.betas), ocfg.eps,
                                              ocfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(
                self.params, lr=self.lr_t, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                fused=True)
        # read by Adam.step and passed to the fused kernel, which skips the update where it is 1.0 (GradScaler's hook)
        self.optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.ema = EMA(nn.ModuleDict(modules), ocfg.ema_decay)
        self._sd_options = StateDictOptions()

    @classmethod
    def from_stage(cls, specs: dict, meshes: Meshes, pcfg: ParallelConfig, ocfg: OptimConfig, device: torch.device,
                   total_steps: int, batch_size: int | None = None) -> "TorchEngine":
        """Materialise a stage's declared modules (``Stage.modules``) and train the trainable ones. A module read from
        a run's checkpoint under FSDP2 goes meta -> sharded -> loaded, so it never exists whole on a rank.
        ``batch_size``: the global batch (DeepSpeed's config needs it; unused here)."""
        from difftrain.train.stages.base import DERIVED, FROZEN, TRAINABLE

        sharded_load = set()  # FSDP2 modules read from a run: meta -> sharded -> DCP load of their own shards

        def build(name: str, spec, trainable: bool) -> nn.Module:
            source = spec.source
            if pcfg.engine == "fsdp2" and source is not None and source.is_run and not source.adapted:
                module = spec.meta()
                if not trainable:
                    module.requires_grad_(False)
                module = parallelize(module, meshes, pcfg, device)
                if not trainable:  # no backward follows its forwards: the root reshards too (not left gathered)
                    module.set_reshard_after_forward(True)
                module.to_empty(device=device)
                source.load(module)
                sharded_load.add(name)
                return module
            return spec.init(device)

        trainable = {n: build(n, s, True) for n, s in specs.items() if s.role == TRAINABLE}
        engine = cls(trainable, meshes, pcfg, ocfg, device, total_steps, wrapped=sharded_load)
        for n, s in specs.items():
            if s.role == FROZEN:
                engine.frozen[n] = build(n, s, False).requires_grad_(False).eval()
            elif s.role == DERIVED:  # the original's architecture, sharded as it is, holding a copy of its weights
                if pcfg.tp > 1:
                    raise ConfigError(f"config key 'parallel.tp' = {pcfg.tp}: this stage's derived module '{n}' (a "
                                      "target network) is not split by tensor parallelism yet; use tp 1")
                if s.of not in trainable:
                    raise ValueError(f"derived module '{n}' copies '{s.of}', which is not a trainable module")
                module = spec_meta_copy(s, trainable[s.of], meshes, pcfg, device)
                engine.derived[n] = module
                engine.derived_of[n] = s.of
        return engine

    @property
    def model(self) -> nn.Module:
        """The one trainable module to call (stages with one; the others use :meth:`live`)."""
        if len(self.models) != 1:
            raise RuntimeError(f"the engine trains {len(self.models)} modules; ask live() for one by name")
        return next(iter(self.models.values()))

    @property
    def module(self) -> nn.Module:
        """The unwrapped trainable module (stages with one)."""
        return next(iter(self.modules.values()))

    def live(self) -> dict[str, nn.Module]:
        """Every module by name: the trainable ones as wrapped for forward, the frozen and derived ones."""
        return {**self.models, **self.frozen, **self.derived}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        with contextlib.ExitStack() as stack:
            for m in self.models.values():
                if self.kind == "ddp":
                    if not last and hasattr(m, "no_sync"):
                        stack.enter_context(m.no_sync())
                else:
                    m.set_requires_gradient_sync(last)
            yield

    def step(self, step: int, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = clip_grad_norm_(self.params, self.max_norm, self.norm_group)
        ok = agree_finite(norm, loss)
        if self.apex:  # FusedAdam cannot skip on the device: decide on the host
            if bool(ok):
                for group in self.optimizer.param_groups:
                    group["lr"] = float(self.lr_t)
                self.optimizer.step()
        else:
            self.optimizer.found_inf = (~ok).to(torch.float32)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += ok
        self._set_lr()
        self.ema.update(step, ok)
        for m in self.models.values():  # an FSDP2 root whose forward ran without grad stays gathered: reshard it,
            if isinstance(m, FSDPModule):  # so the EMA swap, checkpoints and the next step see the shards (no-op
                m.reshard()  # after a backward)
        return norm, ok

    def _set_lr(self) -> None:
        """The next update's learning rate: the schedule at the number of updates applied (``take``: a tensor index
        that needs no host sync)."""
        self.lr_t.copy_(self.lr_table.take(self.updates.clamp(max=len(self.lr_table) - 1)))

    def lr(self) -> float:
        return float(self.lr_t)

    @torch.no_grad()
    def finite_state(self) -> bool:
        return all_finite([_local(t) for t in (*self.params, *self.ema.state_dict().values())], self.device)

    # -- checkpoint state: tensors only; the LR schedule is a function of the applied updates -----
    def frozen_keys(self) -> dict[str, set[str]]:
        """Per trainable module, its parameters without grad: the frozen base under model changes (LoRA). Setting
        ``base_keys`` to (some of) them leaves them out of checkpoints, and out of their derived copies' too: a
        resume rebuilds them from their source (recorded by fingerprint by the trainer) and reads the rest."""
        return {n: {k for k, p in m.named_parameters() if not p.requires_grad} for n, m in self.modules.items()}

    def _without_base(self, sd: dict, name: str | None) -> dict:
        """``sd`` less the base keys: of module ``name`` when ``sd`` is that module's own state dict; by each key's
        module prefix when ``name`` is None (the container's ``NAME.*``)."""
        if not self.base_keys:
            return sd
        if name is None:
            return {k: v for k, v in sd.items()
                    if k.partition(".")[2] not in self.base_keys.get(k.partition(".")[0], ())}
        base = self.base_keys.get(name, ())
        return {k: v for k, v in sd.items() if k not in base}

    def state_dict(self) -> dict:
        """Under tensor parallelism the strided shards (fused q/k/v) are whole here, everything else as held."""
        out = self._state_dict()
        return savable(out) if self.tp else out

    def _state_dict(self) -> dict:
        model_sd = self._without_base(get_model_state_dict(self.container, options=self._sd_options), None)
        optim_sd = get_optimizer_state_dict(self.container, self.optimizer, options=self._sd_options)
        out = {"model": model_sd, "optim": optim_sd["state"], "ema": self.ema.state_dict()}
        if self.derived:
            out["derived"] = {n: self._without_base(get_model_state_dict(m, options=self._sd_options),
                                                    self.derived_of.get(n, ""))
                              for n, m in self.derived.items()}
        return out

    def load_state_dict(self, sd: dict, step: int, updates: int | None = None) -> None:
        if self.tp:  # whole tensors (state_dict's) into the strided shards they stand for
            sd = load_whole_into(self._state_dict(), sd)
        # without its base, a module's state is partial: the base keys keep the weights its source gave them
        partial = StateDictOptions(strict=False) if self.base_keys else self._sd_options
        set_model_state_dict(self.container, sd["model"], options=partial)
        for n, m in self.derived.items():
            set_model_state_dict(m, sd["derived"][n], options=partial)
        groups = get_optimizer_state_dict(self.container, self.optimizer, options=self._sd_options)["param_groups"]
        set_optimizer_state_dict(self.container, self.optimizer, {"state": sd["optim"], "param_groups": groups},
                                 options=self._sd_options)
        self.ema.load_state_dict(sd["ema"])
        for group in self.optimizer.param_groups:  # load_state_dict put a deep copy of the lr tensor there
            group["lr"] = float(self.lr_t) if self.apex else self.lr_t
        # the updates applied so far (skipped steps excluded): the train state's count; for older checkpoints the
        # optimizer's own step counters, whose maximum is it only when every step updates every parameter
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        if updates is not None:
            self.updates.fill_(updates)
        elif steps:
            self.updates.copy_(torch.stack([s.to(self.device) for s in steps]).max())
        else:
            self.updates.zero_()
        self._set_lr()

    def ema_swapped_in(self):
        return self.ema.swapped_in()


ENGINES: dict[str, type[Engine]] = {"ddp": TorchEngine, "fsdp2": TorchEngine}  # config key parallel.engine
# "deepspeed": train/deepspeed_engine.py registers itself (it subclasses Engine; deepspeed is imported on first use)
importlib.import_module("difftrain.train.deepspeed_engine")
