"""torchao's QAT numerics as a QAT scheme (``adapt: [{kind: qat, scheme: int4_weight, weight_bits: 4, granularity:
group}]``): the weight quantiser is torchao's own fake quantizer for the torchao post-training config the scheme
names, so convert (:func:`~difftrain.quant.modules.fold`) gives exactly the integers that config computes, and a
diffusers ``TorchAoConfig`` with it quantises the full-precision QAT weights on load to the same integers
(``quant/torchao_export.py``).

    scheme                     torchao config (0.18)                                        weights  activations
    int8_weight                IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=G)  int8     float
    int4_weight                IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=G)  int4     float
    int8_dynamic               Int8DynamicActivationIntxWeightConfig(                        int8     int8 per token
                                   weight_dtype=torch.int8, weight_granularity=G)
    int8_dynamic_int4_weight   the same with weight_dtype=torch.int4                         int4     int8 per token

G is ``PerAxis(0)`` for ``granularity: channel`` and ``PerGroup(group_size)`` for ``granularity: group``; weights are
symmetric (z = 0, the signed range), and the scheme's bits must be the entry's ``weight_bits`` / ``act_bits``, so a
run's config states its numerics. torchao pairs each config with its fake quantizers (``QATConfig(base,
step="prepare")``, which we let torchao build on a probe Linear and reuse): weight scales from the weight at every
step (s = max|w| / ((q_max − q_min) / 2) per channel or group, no learned step size), and for the dynamic schemes
asymmetric int8 activations with (s, z) from each token's own min / max at every forward. torchao applies them to
``nn.Linear``; here the same quantizers also serve ``nn.Conv2d``: its weight flattened to [out, in · kh · kw] (as
``fake.grouped`` does), its input quantised per pixel over channels (a token of a conv is a pixel).

The dynamic activation mode is kept apart from our static one (``ActQuant``: calibrated, LSQ-learned, per t-interval):
it has no step sizes to learn, calibrate or index by t, so ``t_intervals`` > 1 and ``tdq`` are refused with it. The
activation quantiser stays in the served model after convert (as a static one does).

Unlike LSQ's, torchao's weight quantiser is no fixed point: s puts the largest |w| at ±(q_max + 0.5), which rounds
to q_max or q_min, so a folded weight quantised again gets another scale and other integers. Convert folds once (the
integers of the trained weights), and the quantise-on-load export writes the unfolded weights for that reason.
"""
from __future__ import annotations

import torch
from torch import nn

from difftrain.config import ConfigError

# scheme -> (weight bits, activation bits: 0 weights only, 8 dynamic per-token int8)
SCHEMES: dict[str, tuple[int, int]] = {"int8_weight": (8, 0), "int4_weight": (4, 0), "int8_dynamic": (8, 8),
                                       "int8_dynamic_int4_weight": (4, 8)}
GRANULARITIES = ("channel", "group")  # torchao's intx configs: PerAxis(0) or PerGroup; no per-tensor scale


def check_scheme(args, key: str) -> None:
    """One-line ``ConfigError`` naming ``KEY.x`` for a qat entry whose settings disagree with its torchao scheme."""
    wbits, abits = SCHEMES[args.scheme]
    say = f"scheme {args.scheme} (torchao's numerics)"
    if args.weight_bits != wbits:
        raise ConfigError(f"config key '{key}.weight_bits' = {args.weight_bits}, but {say} quantises weights to "
                          f"{wbits} bits; set weight_bits: {wbits}")
    if args.act_bits != abits:
        what = "keeps activations in float" if not abits else "quantises activations to int8 per token"
        raise ConfigError(f"config key '{key}.act_bits' = {args.act_bits}, but {say} {what}; set act_bits: {abits}")
    if not args.symmetric:
        raise ConfigError(f"config key '{key}.symmetric' = false, but {say} has symmetric weights (z = 0); set "
                          "symmetric: true")
    if args.granularity not in GRANULARITIES:
        raise ConfigError(f"config key '{key}.granularity' = {args.granularity!r}, but {say} has one scale per "
                          "output channel or per group; set granularity: channel or group")
    if abits and args.act_symmetric:
        raise ConfigError(f"config key '{key}.act_symmetric' = true, but {say} quantises activations asymmetrically "
                          "(each token's min / max); set act_symmetric: false")
    if args.t_intervals > 1 or getattr(args, "tdq", False):
        name = "tdq" if getattr(args, "tdq", False) else "t_intervals"
        raise ConfigError(f"config key '{key}.{name}': {say} has no activation step sizes to make timestep-aware "
                          "(dynamic scales come from each token); use scheme: lsq for timestep-aware activations")


def base_config(args):
    """The torchao post-training config that ``args.scheme`` trains for (and an export's TorchAoConfig applies)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    wbits, abits = SCHEMES[args.scheme]
    dtype = getattr(torch, f"int{wbits}")
    granularity = PerAxis(0) if args.granularity == "channel" else PerGroup(args.group_size)
    if abits:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def config_source(args) -> tuple[str, str]:
    """(the import line, the Python expression) of :func:`base_config`, for an export's ``from_pretrained`` call."""
    wbits, abits = SCHEMES[args.scheme]
    granularity = "PerAxis(0)" if args.granularity == "channel" else f"PerGroup({args.group_size})"
    cls, gkey = ("Int8DynamicActivationIntxWeightConfig", "weight_granularity") if abits else (
        "IntxWeightOnlyConfig", "granularity")
    return (f"from torchao.quantization import {cls}\nfrom torchao.quantization.granularity import "
            f"{granularity.split('(')[0]}", f"{cls}(weight_dtype=torch.int{wbits}, {gkey}={granularity})")


def fake_quantizers(base, fan_in: int) -> tuple[nn.Module | None, nn.Module]:
    """torchao's (activation, weight) fake quantizers for the PTQ config ``base``: ``QATConfig(base, step="prepare")``
    applied to a probe Linear on the meta device (torchao's public way to pair a PTQ config with its QAT numerics)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    probe = nn.Sequential(nn.Linear(fan_in, 1, bias=False, device="meta"))
    quantize_(probe, QATConfig(base, step="prepare"))
    return probe[0].activation_fake_quantizer, probe[0].weight_fake_quantizer


def _forget(fq: nn.Module) -> None:
    """Drop the (s, z) torchao's quantizer keeps from its last call: dynamic, recomputed every call, and a non-leaf
    tensor of the last step's graph that ``copy.deepcopy`` (an EMA copy, convert) cannot copy."""
    fq.scale = fq.zero_point = None


class TorchaoWeightQuant(nn.Module):
    """A Linear's / Conv2d's weight through torchao's weight fake quantizer for the scheme's config, the weight
    flattened to [out, fan_in]. No state: scales come from the weight at every call."""

    def __init__(self, fake: nn.Module, base, spec: dict):
        super().__init__()
        self.fake, self.base, self.spec = fake, base, spec  # spec: what rebuilds it (JSON)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = self.fake(w.reshape(w.shape[0], -1)).reshape(w.shape)
        _forget(self.fake)
        return out

    @torch.no_grad()
    def ints(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integers [out, fan_in] int8, scales [out, groups], zero points [out, groups]) that torchao's PTQ config
        computes for ``w`` (``quantize_`` of a Linear holding the flattened weight: what a TorchAoConfig load does)."""
        from torchao.quantization import quantize_

        w2 = w.detach().reshape(w.shape[0], -1)
        holder = nn.Sequential(nn.Linear(w2.shape[1], w2.shape[0], bias=False, device=w.device, dtype=w.dtype))
        holder[0].weight = nn.Parameter(w2.clone(), requires_grad=False)
        quantize_(holder, self.base)
        q = holder[0].weight
        return q.qdata, q.scale, q.zero_point


class TorchaoTokenQuant(nn.Module):
    """A layer's input through torchao's per-token dynamic int8 fake quantizer (asymmetric: each token's own min /
    max at every call): a Linear's tokens are its input's last dimension, a Conv2d's are its pixels (the channel
    dimension moved last and back). Computed in float32, as a float32 TorchAoConfig load computes it."""

    def __init__(self, fake: nn.Module, spec: dict, conv: bool):
        super().__init__()
        self.fake, self.spec, self.conv = fake, spec, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float().movedim(1, -1) if self.conv else x.float()
        out = self.fake(v)
        _forget(self.fake)
        return (out.movedim(-1, 1) if self.conv else out).to(x.dtype)


def torchao_quantisers(args, layer: nn.Module) -> tuple[TorchaoWeightQuant, TorchaoTokenQuant | None]:
    """The (weight, activation) quantisers of ``layer`` (a Linear or Conv2d) for the entry's torchao scheme."""
    base = base_config(args)
    spec = {"scheme": args.scheme, "granularity": args.granularity, "group_size": args.group_size}
    act, weight = fake_quantizers(base, layer.weight[0].numel())
    return (TorchaoWeightQuant(weight, base, spec),
            TorchaoTokenQuant(act, spec, isinstance(layer, nn.Conv2d)) if act is not None else None)
