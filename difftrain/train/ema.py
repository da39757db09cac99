"""Exponential moving average of the trainable weights, sharded like the weights themselves.

Under FSDP2 the parameters are DTensors, so ``p.detach().clone()`` gives an EMA that is sharded
the same way: each rank holds 1/world of it, and the update touches only local shards (no
communication). Sampling with the EMA swaps it into the live parameters on every rank, so the
usual forward (with its all-gathers) runs with EMA weights.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def lerp_shadow(shadow: list, live: list, decay: float, ok: torch.Tensor | None) -> None:
    """``shadow += (1 - decay) * ok * (live - shadow)`` over lists of local tensors (``ok`` None: always)."""
    if ok is None:
        torch._foreach_lerp_(shadow, live, 1.0 - decay)
        return
    weights: dict = {}  # one 0-dim weight per (device, dtype): lerp wants the weight's type to match
    for s in shadow:
        if (s.device, s.dtype) not in weights:
            weights[s.device, s.dtype] = ok.to(device=s.device, dtype=s.dtype) * (1.0 - decay)
    torch._foreach_lerp_(shadow, live, [weights[s.device, s.dtype] for s in shadow])


@torch.no_grad()
def follow(target: nn.Module, live: nn.Module, decay: float, ok: torch.Tensor | None = None) -> None:
    """A target network's update (a stage's derived module, ``Stage.after_step``): ``target <- decay target +
    (1 - decay) live`` parameter by parameter, on the local shards (both are sharded alike: no communication), the
    weight multiplied by ``ok`` so that a skipped step leaves the target bitwise unchanged without a host sync.
    ``live`` may be wrapped by DDP (its ``module.`` prefix is matched)."""
    params = dict(live.named_parameters())
    pairs = [(p, params.get(n, params.get("module." + n))) for n, p in target.named_parameters()]
    missing = [n for (n, _), (_, q) in zip(target.named_parameters(), pairs) if q is None]
    if missing:
        raise ValueError(f"target network parameter '{missing[0]}' has no counterpart in the live module")
    lerp_shadow([_local(p) for p, _ in pairs], [_local(q) for _, q in pairs], decay, ok)


def warmup_decay(decay: float, step: int) -> float:
    """The EMA decay at ``step``: warmed up as in Karras et al. 2022 / common practice (no averaging over the first
    steps), ``decay`` after."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int, ok: torch.Tensor | None = None) -> None:
        """``shadow += (1 - decay) * (live - shadow)``; with ``ok`` (a 0-dim bool device tensor) the weight is
        multiplied by it, so a skipped step leaves the EMA bitwise unchanged without a host sync."""
        lerp_shadow([_local(self.shadow[n]) for n in self.params], [_local(p) for p in self.params.values()],
              warmup_decay(self.decay, step), ok)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for n, t in sd.items():
            if t is not self.shadow[n]:
                _local(self.shadow[n]).copy_(_local(t))

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the live parameters (all ranks must enter)."""
        with torch.no_grad():
            backup = {n: _local(p).clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                _local(p).copy_(_local(self.shadow[n]))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    _local(p).copy_(backup[n])
