"""Engines own how a step is executed: the wrapped model, backward, optimizer, LR schedule, EMA and
the tensors that go into a checkpoint.

The Trainer only calls the ``Engine`` interface, so an engine that brings its own optimizer,
backward and checkpoint format (DeepSpeed, a later issue) plugs in without touching the loop.
``TorchEngine`` covers DDP and FSDP2 (optionally HSDP) on any device.
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from difftrain.config import OptimConfig, ParallelConfig
from difftrain.parallelism.dims import Meshes
from difftrain.parallelism.parallelize import parallelize
from difftrain.train.ema import EMA


class Engine(ABC):
    model: nn.Module  # call this for forward (may be a wrapper)
    module: nn.Module  # the unwrapped model: parameter names, export, sampling

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch; gradients are synchronised only when ``last``."""

    @abstractmethod
    def step(self, step: int) -> torch.Tensor:
        """Clip, update, advance the LR schedule and EMA; returns the pre-clip grad norm (a tensor)."""

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def state_dict(self) -> dict:
        """Tensors only (nested dicts), for torch.distributed.checkpoint."""

    @abstractmethod
    def load_state_dict(self, sd: dict, step: int) -> None: ...

    @abstractmethod
    def ema_swapped_in(self) -> contextlib.AbstractContextManager: ...


def lr_lambda(ocfg: OptimConfig, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""
    def f(step: int) -> float:
        if ocfg.warmup_steps and step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        if ocfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - ocfg.warmup_steps)
        progress = min(1.0, (step - ocfg.warmup_steps) / span)
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@torch.no_grad()
def local_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Grad norm of these parameters over the data-parallel shards (DTensor norms reduce over the mesh)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, group=None) -> torch.Tensor:
    """Global grad norm (over the shards, and summed over ``group``'s ranks, e.g. the pipeline stages, each holding
    other parameters), then clip."""
    norm = local_grad_norm(params)
    if group is not None:
        import torch.distributed as dist

        sq = norm.square()
        dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm, foreach=True)
    return norm


class TorchEngine(Engine):
    """DDP or FSDP2 with torch's AdamW, a LambdaLR schedule and a (sharded) EMA."""

    norm_group = None  # ranks whose grad norms add up (the pipeline stages); None = this rank's parameters

    def __init__(self, module: nn.Module, meshes: Meshes, pcfg: ParallelConfig, ocfg: OptimConfig,
                 device: torch.device, total_steps: int, wrapped: bool = False):
        """``wrapped``: ``module`` is already parallelised (pipeline stages wrap each stage themselves)."""
        self.module = module
        self.kind = pcfg.engine
        self.model = module if wrapped else parallelize(module, meshes, pcfg, device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.max_norm = ocfg.grad_clip
        self.optimizer = torch.optim.AdamW(
            self.params, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay,
            foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(ocfg, total_steps))
        self.ema = EMA(module, ocfg.ema_decay)
        self._sd_options = StateDictOptions()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        if self.kind == "ddp":
            with (contextlib.nullcontext() if last else self.model.no_sync()):
                yield
        else:
            self.model.set_requires_gradient_sync(last)
            yield

    def step(self, step: int) -> torch.Tensor:
        norm = clip_grad_norm_(self.params, self.max_norm, self.norm_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(step)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoint state: tensors only; the LR schedule is a function of the step ----------------
    def state_dict(self) -> dict:
        model_sd = get_model_state_dict(self.model, options=self._sd_options)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=self._sd_options)
        return {"model": model_sd, "optim": optim_sd["state"], "ema": self.ema.state_dict()}

    def load_state_dict(self, sd: dict, step: int) -> None:
        set_model_state_dict(self.model, sd["model"], options=self._sd_options)
        groups = get_optimizer_state_dict(self.model, self.optimizer, options=self._sd_options)["param_groups"]
        set_optimizer_state_dict(self.model, self.optimizer, {"state": sd["optim"], "param_groups": groups},
                                 options=self._sd_options)
        self.ema.load_state_dict(sd["ema"])
        self.scheduler.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, [b * self.scheduler.lr_lambdas[0](step)
                                                            for b in self.scheduler.base_lrs]):
            group["lr"] = lr
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def ema_swapped_in(self):
        return self.ema.swapped_in()
