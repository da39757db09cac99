"""Fake-quantised ``nn.Linear`` / ``nn.Conv2d`` by module swap: the layer keeps its class's weights and state-dict
keys (``weight``, ``bias``) and gains ``weight_quant`` (learned LSQ step sizes per tensor, channel or group) and
``act_quant`` (a static per-tensor activation step size, learned by LSQ from a calibrated start, optionally one per
t-interval). The class is swapped in place (as DiffFit and FSDP2's ``fully_shard`` do), so names, hooks and targets
stay put and ``isinstance(m, nn.Linear)`` still holds.

Timestep-aware activations (EfficientDM's TALSQ, He et al. 2023, arXiv:2310.03270: one activation step size per
denoising step; here per interval of t ∈ [0, 1]: interval k = ⌊t · K⌋ holds t ∈ [k/K, (k+1)/K)): the layers read t
from a :class:`TimeContext` that a forward pre-hook on the whole model fills from its ``forward(x_t, t, cond)``
argument, the signature the DiT and the UNet share, so no model file changes. t is per sample ([B]): a layer whose
batch is a multiple r of B (a video block's (B·frames) rows, b-major) repeats each sample's step size r times.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difftrain.config import ConfigError
from difftrain.quant.fake import fake_quant, grouped, int_range, range_init


class TimeContext:
    """The t of the model's current forward ([B] or a scalar), set by :meth:`hook` (a forward pre-hook on the model).
    A plain object shared by the model's quantised layers: ``copy.deepcopy`` of the model (an EMA or target copy)
    copies it once, with the hook's bound method, so each copy reads its own t."""

    def __init__(self):
        self.t: torch.Tensor | None = None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("t")
        self.t = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)


class LogStep(nn.Module):
    """A step size s = s₀ · exp(θ): s₀ (buffer ``step0``) the calibrated start, θ (``log_scale``) what trains. The
    trainer's AdamW moves every parameter by about its lr per step whatever the gradient's scale (so LSQ's g only
    matters under SGD), which for a raw step of 1e-3 is a relative jump of 10% at lr 1e-4 and can drive s below 0;
    in the log domain the same update is a relative change of lr, and s stays positive (TQT, Jain et al. 2020,
    arXiv:1903.08066, trains log2 thresholds for the same reason). ∂L/∂θ = s · ∂L/∂s: LSQ's gradient, chained."""

    @property
    def scale(self) -> torch.Tensor:
        return self.step0 * self.log_scale.exp()


class WeightQuant(LogStep):
    """LSQ fake quantisation of a weight: step sizes [out, groups, 1] (one per tensor, output channel or group of
    ``group_size`` input weights), an integer zero point per step when asymmetric. Initialised to the weight's range
    (min/max), so a fresh layer at high bits is the float layer to rounding. The step size trains in the log domain,
    s = s₀ · exp(θ) (:class:`LogStep`)."""

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool, granularity: str, group_size: int):
        super().__init__()
        self.spec = {"bits": bits, "symmetric": symmetric, "granularity": granularity, "group_size": group_size}
        self.granularity, self.group_size = granularity, group_size
        self.qmin, self.qmax = int_range(bits, symmetric)
        with torch.no_grad():
            v = grouped(weight.detach().float(), granularity, group_size)
            s, z = range_init(v, self.qmin, self.qmax, symmetric)
        self.register_buffer("step0", s.to(weight.dtype))
        self.log_scale = nn.Parameter(torch.zeros_like(self.step0))
        self.zero = nn.Parameter(z.to(weight.dtype)) if z is not None else None
        self.g = 1.0 / math.sqrt(v.shape[-1] * self.qmax)  # LSQ Eq. 5: N = the weights sharing a step

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v = grouped(w, self.granularity, self.group_size)
        return fake_quant(v, self.scale, self.zero, self.qmin, self.qmax, self.g).reshape(w.shape)


class ActQuant(LogStep):
    """LSQ fake quantisation of a layer's input with static per-tensor step sizes, ``intervals`` of them over t
    (1: not timestep-aware). They start from the first batch the layer sees (:meth:`calibrate`: the ``percentile``
    of |x|, or of x's two tails when asymmetric, the same on every rank); a checkpoint carries them and the
    ``calibrated`` flag."""

    def __init__(self, bits: int, symmetric: bool, intervals: int, percentile: float, clock: TimeContext | None,
                 key: str):
        super().__init__()
        # what rebuilds it (JSON; an export's loader passes it back with a clock and a key)
        self.spec = {"bits": bits, "symmetric": symmetric, "intervals": intervals, "percentile": percentile}
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.percentile, self.clock, self.key = percentile, clock, key
        self.register_buffer("step0", torch.ones(intervals))
        self.log_scale = nn.Parameter(torch.zeros(intervals))
        self.zero = None if symmetric else nn.Parameter(torch.zeros(intervals))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._ready = False  # calibrated, known without a device sync

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Every interval's (s, z) from ``x``'s range (max over ranks under torch.distributed, so that replicas
        agree). Intervals the first batch misses start from the same values; LSQ moves each apart."""
        v = x.detach().float().flatten()
        v = v[:: max(1, v.numel() // 2 ** 22)]  # a strided sample: torch.quantile takes at most 2^24 values
        hi, lo = (v.abs().quantile(self.percentile), None) if self.zero is None else (
            v.quantile(self.percentile).clamp_min(0), (-v).quantile(self.percentile).clamp_min(0))
        stat = torch.stack([hi] if lo is None else [hi, lo])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(stat, op=torch.distributed.ReduceOp.MAX)
        s, z = range_init(torch.stack([-stat[1], stat[0]]) if lo is not None else stat, self.qmin, self.qmax,
                          self.zero is None)
        self.step0.fill_(s.item())
        self.log_scale.zero_()
        if self.zero is not None:
            self.zero.fill_(z.item())
        self.calibrated.fill_(True)

    def step_sizes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s, z) broadcastable against ``x``: one value, or each sample's interval's value (t from the clock)."""
        K = self.step0.shape[0]
        if K == 1:
            return self.scale, self.zero
        t = self.clock.t if self.clock is not None else None
        if t is None:
            raise RuntimeError(f"{self.key}: timestep-aware activation scales need t, which the model's forward(x_t, "
                               "t, cond) sets; this layer ran outside it (a pipelined segment?)")
        k = (t.float().reshape(-1) * K).long().clamp(0, K - 1).to(x.device)  # [B] (or [1]: one t for all)
        if x.shape[0] % k.numel():
            raise RuntimeError(f"{self.key}: a layer's batch {x.shape[0]} is not a multiple of t's {k.numel()}")
        k = k.repeat_interleave(x.shape[0] // k.numel())
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.scale[k].view(shape), self.zero[k].view(shape) if self.zero is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            if not bool(self.calibrated):
                self.calibrate(x)
            self._ready = True
        s, z = self.step_sizes(x)
        g = 1.0 / math.sqrt(x[0].numel() * self.qmax)  # LSQ Eq. 5: N = the layer's features (per sample)
        # in float32: bf16 (autocast) holds the integers exactly only up to 256
        return fake_quant(x.float(), s.float(), z.float() if z is not None else None, self.qmin, self.qmax,
                          g).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        theirs = state_dict.get(prefix + "step0")
        if theirs is not None and theirs.shape != self.step0.shape:
            raise ConfigError(f"config key '{self.key}.t_intervals' = {self.step0.shape[0]}, but the loaded "
                              f"activation scales ({prefix}step0) were learnt for {theirs.shape[0]} t-intervals")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = False


class Quantised:
    """Mixed into a Linear's / Conv2d's class: input through ``act_quant`` (when set), weight through
    ``weight_quant`` (when set; None once the weights are folded: :func:`fold`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight_quant(self.weight) if self.weight_quant is not None else self.weight
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w, self.bias)
        return F.linear(x, w, self.bias)


_CLASSES: dict[type, type] = {}


def quantise(layer: nn.Module, weight: WeightQuant | None, act: ActQuant | None) -> None:
    """Swap ``layer``'s class for its quantised one, in place, with these quantisers."""
    cls = type(layer)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quantised{cls.__name__}", (Quantised, cls), {})
    layer.weight_quant, layer.act_quant = weight, act
    layer.__class__ = _CLASSES[cls]


@torch.no_grad()
def fold(layer: nn.Module) -> None:
    """Convert: the weight replaced by its fake-quantised value (s · (k − z): the dequantised integers an export
    holds) and the weight quantiser dropped; the plain class is restored when no activation quantiser remains."""
    if layer.weight_quant is not None:
        layer.weight.copy_(layer.weight_quant(layer.weight))
        layer.weight_quant = None
    if layer.act_quant is None:
        del layer.weight_quant, layer.act_quant
        layer.__class__ = type(layer).__bases__[1]  # Quantised{X}(Quantised, X) -> X
