"""Fake-quantised ``nn.Linear`` / ``nn.Conv2d`` by module swap: the layer keeps its class's weights and state-dict
keys (``weight``, ``bias``) and gains ``weight_quant`` (learned LSQ step sizes per tensor, channel or group) and
``act_quant`` (a static per-tensor activation step size, learned by LSQ from a calibrated start, optionally one per
t-interval). The class is swapped in place (as DiffFit and FSDP2's ``fully_shard`` do), so names, hooks and targets
stay put and ``isinstance(m, nn.Linear)`` still holds.

Timestep-aware activations (EfficientDM's TALSQ, He et al. 2023, arXiv:2310.03270: one activation step size per
denoising step; here per interval of t ∈ [0, 1]: interval k = ⌈t · K⌉ − 1 holds t ∈ (k/K, (k+1)/K], :func:`interval`;
or TDQ's small network of t, :class:`TimeNet`): the layers read t
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


def interval(t: torch.Tensor, K: int) -> torch.Tensor:
    """The t-interval of each t: k = ⌈t · K⌉ − 1, i.e. t ∈ (k/K, (k+1)/K] (t = 0 in the first). Closed at the top,
    so an N-step sampler's grid t_j = 1 − j/N (j < N) falls in N distinct intervals when K = N."""
    return (t * K).ceil().long().sub(1).clamp(0, K - 1)


def check_sampling_grid(model: nn.Module, ts: torch.Tensor) -> None:
    """Refuse in one line to sample ``model`` on times ``ts`` (the sampler's evaluated grid) when one falls in a
    t-interval whose activation step size no calibration forward reached (learnt for another step count: an
    N-step trajectory's scales cover N intervals' worth of t)."""
    from difftrain.config import ConfigError

    for name, m in model.named_modules():
        if isinstance(m, ActQuant) and m.step0.shape[0] > 1:
            K = m.step0.shape[0]
            seen = (m.stat[:, -1] > 0).cpu()
            k = interval(ts.cpu().float(), K)
            bad = [(float(t), int(i)) for t, i in zip(ts.cpu(), k) if not seen[i]]
            if bad and bool(seen.any()):
                raise ConfigError(f"{m.key}: the activation step sizes of '{name}' were calibrated for t-intervals "
                                  f"{seen.nonzero().flatten().tolist()} of {K}; sampling evaluates t = {bad[0][0]:.4g}"
                                  f" in interval {bad[0][1]}, which none reached: sample with the step count the run "
                                  "was trained on, or calibrate over every interval")
            return  # every layer was calibrated on the same forwards: the first tells


MAX_CALIBRATION = 100  # calibration forwards at most, waiting for every t-interval to be seen


class TimeNet(nn.Module):
    """TDQ's step-size generator (So et al. 2023, "Temporal Dynamic Quantization for Diffusion Models", NeurIPS,
    arXiv:2306.02316, Sec. 3.2: a frequency encoding of t through a small MLP gives the layer's step size): here
    it gives a log-domain offset Δ(t), s(t) = s₀ · exp(θ + Δ(t)) (:class:`LogStep`'s parametrisation; TDQ's softplus
    output keeps s positive too). The last layer starts at zero, so a fresh layer is the calibrated static one."""

    def __init__(self, freqs: int = 8, width: int = 16):
        super().__init__()
        self.freqs = freqs
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.float().reshape(-1, 1) * (torch.pi * 2.0 ** torch.arange(self.freqs, device=t.device))
        return self.mlp(torch.cat([a.sin(), a.cos()], -1)).reshape(-1)  # [B]


class ActQuant(LogStep):
    """LSQ fake quantisation of a layer's input with static per-tensor step sizes: ``intervals`` of them over t (1:
    not timestep-aware; EfficientDM's TALSQ for > 1), or one times TDQ's function of t (``tdq``, :class:`TimeNet`).

    Calibration (the step sizes' start, the PTQ baseline's whole job): the first ``calibrate`` training forwards
    each take the ``percentile`` of |x| (of x's two tails when asymmetric) of the rows whose t lies in each interval,
    the maximum over those forwards and over ``group``'s ranks (None: the world; a pipeline stage's data-parallel
    replicas under pp), so that replicas agree and 2 ranks see what one process sees. Forwards after those go on
    calibrating the intervals no row has reached yet, each from the first forward that reaches it (at most
    :data:`MAX_CALIBRATION` forwards in all); until then such an interval starts from the largest seen. Sampling
    refuses a grid with a t in an interval never seen (:func:`check_sampling_grid`). Calibration writes buffers only (``step0``, ``zero0``, the running
    ``stat``): the trained ``log_scale`` / ``zero_shift`` stay where the optimizer put them, and an FSDP2-sharded
    parameter is never written from inside its forward. Eval-mode forwards never calibrate (a rank-0-only sample
    grid would otherwise wait on a collective the other ranks never join). A checkpoint carries the step sizes, the
    stats and the count."""

    def __init__(self, bits: int, symmetric: bool, intervals: int, percentile: float, clock: TimeContext | None,
                 key: str, calibrate: int = 1, tdq: bool = False):
        super().__init__()
        # what rebuilds it (JSON; an export's loader passes it back with a clock and a key)
        self.spec = {"bits": bits, "symmetric": symmetric, "intervals": intervals, "percentile": percentile,
                     "calibrate": calibrate, "tdq": tdq}
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.percentile, self.clock, self.key, self.calibrate_steps = percentile, clock, key, calibrate
        self.group = None
        self.symmetric = symmetric
        self.register_buffer("step0", torch.ones(intervals))
        self.log_scale = nn.Parameter(torch.zeros(intervals))
        if not symmetric:
            self.register_buffer("zero0", torch.zeros(intervals))
            self.zero_shift = nn.Parameter(torch.zeros(intervals))
        # per interval: the running max of hi (, lo) and whether a calibration forward saw it
        self.register_buffer("stat", torch.zeros(intervals, 2 if symmetric else 3))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.long))  # calibration forwards done
        self.tdq = TimeNet() if tdq else None
        self._ready = False  # calibrated, known without a device sync

    @property
    def zero(self) -> torch.Tensor | None:
        return None if self.symmetric else self.zero0 + self.zero_shift

    def intervals_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's t-interval ([rows], long), or None when one step size serves every t."""
        K = self.step0.shape[0]
        if K == 1 and self.tdq is None:
            return None
        t = self.clock.t if self.clock is not None else None
        if t is None:
            raise RuntimeError(f"{self.key}: timestep-aware activation scales need t, which the model's forward(x_t, "
                               "t, cond) sets; this layer ran outside it")
        t = t.float().reshape(-1).to(x.device)
        if x.shape[0] % t.numel():
            raise RuntimeError(f"{self.key}: a layer's batch {x.shape[0]} is not a multiple of t's {t.numel()}")
        return t.repeat_interleave(x.shape[0] // t.numel())

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Merge one forward's per-interval range statistics into ``stat`` and set (s₀, z₀) from them: over the
        first ``calibrate`` forwards every interval's maximum; after them only intervals not seen yet take theirs."""
        K = self.step0.shape[0]
        rows = x.detach().float().reshape(x.shape[0], -1)
        t = self.intervals_of(x)
        k = interval(t, K) if K > 1 else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        stat = torch.zeros_like(self.stat)  # [K, hi (, lo), seen]
        for i in k.unique().tolist():
            v = rows[k == i].flatten()
            v = v[:: max(1, v.numel() // 2 ** 22)]  # a strided sample: torch.quantile takes at most 2^24 values
            q = [v.abs().quantile(self.percentile)] if self.symmetric else [
                v.quantile(self.percentile).clamp_min(0), (-v).quantile(self.percentile).clamp_min(0)]
            stat[i] = torch.stack([*q, torch.ones((), device=x.device)]).to(stat)
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(stat, op=dist.ReduceOp.MAX, group=self.group)
        seen = self.stat[:, -1] > 0
        if int(self.calibrated) < self.calibrate_steps:
            self.stat.copy_(torch.maximum(self.stat, stat))
        else:  # the extra forwards calibrate intervals still unseen, and leave the others as they are
            self.stat.copy_(torch.where(seen[:, None], self.stat, stat))
        seen = self.stat[:, -1] > 0
        hi = torch.where(seen[:, None], self.stat[:, :-1], self.stat[:, :-1].amax(0, keepdim=True))  # unseen: the
        bounds = hi if self.symmetric else torch.stack([-hi[:, 1], hi[:, 0]], -1)  # largest seen
        s, z = range_init(bounds, self.qmin, self.qmax, self.symmetric)
        self.step0.copy_(s.reshape(-1))
        if not self.symmetric:
            self.zero0.copy_(z.reshape(-1))
        self.calibrated.add_(1)

    def done(self) -> bool:
        """Calibration is over: ``calibrate`` forwards, and every interval seen (or :data:`MAX_CALIBRATION` forwards)."""
        n = int(self.calibrated)
        return n >= MAX_CALIBRATION or (n >= self.calibrate_steps and bool((self.stat[:, -1] > 0).all()))

    def step_sizes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s, z) broadcastable against ``x``: one value, or each row's: its t-interval's, or TDQ's s(t)."""
        t = self.intervals_of(x)
        if t is None:
            return self.scale, self.zero
        k = interval(t, self.step0.shape[0])
        shape = (-1,) + (1,) * (x.dim() - 1)
        log_s = self.log_scale[k] + (self.tdq(t) if self.tdq is not None else 0.0)
        z = self.zero
        return (self.step0[k] * log_s.exp()).view(shape), z[k].view(shape) if z is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready and self.training and not x.is_meta:  # (a meta forward traces shapes only)
            self._ready = self.done()
            if not self._ready:
                self.calibrate(x)
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


def set_calibration_group(model: nn.Module, group) -> None:
    """The process group whose ranks hold replicas of ``model``'s quantised layers (a pipeline stage's
    data-parallel group), over which activation calibration takes its maximum."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.group = group


class Quantised:
    """Mixed into a Linear's / Conv2d's class: input through ``act_quant`` (when set), weight through
    ``weight_quant`` (when set; None once the weights are folded: :func:`fold`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantised_forward(x, self.weight)

    def quantised_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer on input ``x`` with weight ``w`` (its own, or QALoRA's W + ΔW) through the quantisers."""
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.weight_quant is not None:
            w = self.weight_quant(w)
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
