"""Quantisation-aware training as a model change (``adapt: [{kind: qat, weight_bits: 4, act_bits: 8}]``):
prepare (:meth:`QAT.apply`) swaps the chosen ``nn.Linear`` / ``nn.Conv2d`` layers for fake-quantised ones
(``quant/modules.py``: LSQ step sizes for the weights per tensor, channel or group, and static per-tensor activation
step sizes, per t-interval when ``t_intervals`` > 1; each trained as log s), training runs on them, and convert
(:meth:`QAT.merge`) folds each weight to its quantised value s · (k − z), so the converted model's outputs equal the
prepared model's.

What trains: the whole model (every weight, bias and norm of the base) and the step sizes and zero points; QAT
fine-tunes the base through the quantiser, so :meth:`QAT.owns` is every parameter, and a checkpoint of a QAT run
holds the full model (no frozen base to leave out).

Layers: every Linear and Conv2d except the model's input and output layers (the DiT's ``patch_embed`` and
``final_layer.linear``, the UNet's ``conv_in`` and ``conv_out``), which stay in full precision as in Q-Diffusion (Li
et al. 2023, arXiv:2302.04304) and EfficientDM (He et al. 2023, arXiv:2310.03270); ``targets`` narrows that to
groups (``finetune/lora.py``'s ``attn``, ``cross_attn``, ``mlp``, ``modulation``) or module-name regexes.

Schemes (``scheme``): ``lsq`` (the default) is ours for both layer types, with learned step sizes and static
activations: torchao 0.18's QAT covers ``nn.Linear`` (and ``nn.Embedding``) only, computes weight scales from the
weight at every step (min/max) unless its prototype ``range_learning`` is on, and has static activation scales for
no t-interval. The torchao schemes (``int8_weight``, ``int4_weight``, ``int8_dynamic``, ``int8_dynamic_int4_weight``;
``quant/torchao_scheme.py``) train with torchao's own fake quantizers for a torchao PTQ config, on Linear and Conv2d
layers alike, with torchao's dynamic per-token activations (kept apart from our static mode), so that convert gives
torchao's integers and ``difftrain export`` can write the weights diffusers' ``TorchAoConfig`` quantises on load
(``quant/torchao_export.py``).

Timestep-aware activations: ``t_intervals`` > 1 (EfficientDM's per-step step sizes) or ``tdq`` (TDQ's small network
of t); calibration over the first ``calibrate`` training forwards (``modules.ActQuant``). The PTQ baseline is the
same change with nothing trained (``optim.lr=0``): the weights' min/max step sizes and the calibrated activations.

Engines: DDP, FSDP2 (calibration writes buffers only, never a sharded parameter) and the pipeline (t rides on the
wire between segments; calibration reduces over a segment's data-parallel replicas). QALoRA: a LoRA after qat in
``adapt`` adds its update inside the weight quantiser (``quant/qalora.py``).

Served model: with ``act_bits`` = 0 convert restores the plain architecture (the change is mergeable); with
activations quantised the layers keep their activation quantisers after convert (``mergeable`` False, as a
ControlNet's branch), since the plain architecture cannot reproduce them.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from difftrain.config import ConfigError, identity
from difftrain.finetune.change import Change
from difftrain.finetune.lora import GROUPS
from difftrain.quant.modules import ActQuant, Quantised, TimeContext, WeightQuant, fold, quantise
from difftrain.quant.torchao_scheme import SCHEMES, check_scheme, torchao_quantisers

EDGES = r"(.*\.)?(patch_embed|final_layer\.linear|conv_in|conv_out)"  # input/output layers: full precision
TARGETS = {"all": rf"(?!(?:{EDGES})$).*", **GROUPS}  # all: every layer but the input and output ones


@dataclass
class QATArgs:
    weight_bits: int = identity(8, ge=2, le=16)
    act_bits: int = identity(0, ge=0, le=16)  # 0: weights only
    symmetric: bool = identity(True)  # weights: signed range, z = 0; False: unsigned range and a zero point
    act_symmetric: bool = identity(True)  # the same for activations
    granularity: str = identity("channel", ("tensor", "channel", "group"))  # weight step sizes
    group_size: int = identity(32, ge=1)  # input weights per step size (granularity=group)
    t_intervals: int = identity(1, ge=1)  # activation step sizes over t ∈ [0, 1]; 1: not timestep-aware
    percentile: float = identity(1.0, gt=0.0, le=1.0)  # activation calibration: this quantile of |x| (1: max)
    calibrate: int = identity(1, ge=1)  # activation calibration: the first N training forwards (their maximum)
    tdq: bool = identity(False)  # activation step sizes s(t) from TDQ's small network of t (not t_intervals)
    targets: list = identity(["all"])  # "all" (every Linear / Conv2d but the edges), groups, or name regexes
    scheme: str = identity("lsq", ("lsq", *SCHEMES))  # lsq: ours; else torchao's numerics (quant/torchao_scheme.py)


class QAT(Change):
    kind = "qat"
    args_class = QATArgs

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        if args.act_bits == 1:
            raise ConfigError(f"config key '{self.key}.act_bits' = 1: use 0 (weights only) or 2..16 bits")
        if args.scheme != "lsq":
            check_scheme(args, self.key)
        if args.tdq and args.t_intervals > 1:
            raise ConfigError(f"config key '{self.key}.tdq': TDQ's network of t replaces the per-interval step sizes "
                              f"(t_intervals = {args.t_intervals}); choose one")
        if args.tdq and not args.act_bits:
            raise ConfigError(f"config key '{self.key}.tdq': timestep-dependent step sizes are for activations; set "
                              "act_bits too")
        if args.t_intervals > 1 and not args.act_bits:
            raise ConfigError(f"config key '{self.key}.t_intervals' = {args.t_intervals}: timestep-aware step sizes "
                              "are for activations; set act_bits too")
        self.mergeable = args.act_bits == 0  # activation quantisers stay in the served model

    def context(self, cfg) -> None:
        for i, e in enumerate(cfg.adapt):  # QALoRA: LoRA after qat, its update inside the weight quantiser
            if not isinstance(e, dict) or e.get("kind") != "lora":
                continue
            if i < self.index:
                raise ConfigError(f"config key 'adapt[{i}]': a LoRA before qat would sit beside the quantised layer; "
                                  "put qat first (adapt: [{kind: qat, ...}, {kind: lora, ...}] is QALoRA)")
            if e.get("dropout", 0.0) or e.get("dora", False):
                raise ConfigError(f"config key 'adapt[{i}].{'dropout' if e.get('dropout', 0.0) else 'dora'}': QALoRA "
                                  "adds the adapter into the weight before quantising it: no input dropout, no DoRA")
        if (self.args.t_intervals > 1 or self.args.tdq) and cfg.parallel.activation_checkpointing:
            raise ConfigError(f"config key '{self.key}': timestep-aware activation step sizes read t when a layer "
                              "runs, and activation checkpointing re-runs layers in the backward pass after another "
                              "forward may have set another t; set parallel.activation_checkpointing=false")

    def layers(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s Linear / Conv2d layers the targets choose (each target checked to match one)."""
        if any(isinstance(m, Quantised) for m in model.modules()):
            raise ConfigError(f"config key '{self.key}': the model is already quantised (one qat entry per model)")
        if any(".lora_" in n for n, _ in model.named_modules()):
            raise ConfigError(f"config key '{self.key}': qat after lora is not built yet; train qat alone")
        names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
        return self.chosen_layers(names, TARGETS, "Linear or Conv2d layer")

    def apply(self, model: nn.Module) -> None:
        a = self.args
        layers = self.layers(model)
        if a.granularity == "group":
            for n in layers:
                fan_in = model.get_submodule(n).weight[0].numel()
                if fan_in % a.group_size:
                    raise ConfigError(f"config key '{self.key}.group_size' = {a.group_size} does not divide layer "
                                      f"{n}'s {fan_in} input weights; pick a divisor, or targets without it")
        clock = None
        if a.t_intervals > 1 or a.tdq:
            clock = TimeContext()
            model.register_forward_pre_hook(clock.hook, with_kwargs=True)
            model.quant_clock = clock  # a pipeline segment sets it itself (it runs blocks, not the model's forward)
        model.requires_grad_(True)  # QAT fine-tunes the whole model through the quantisers
        for n in layers:
            layer = model.get_submodule(n)
            if a.scheme != "lsq":  # torchao's fake quantizers (quant/torchao_scheme.py)
                quantise(layer, *torchao_quantisers(a, layer))
                continue
            wq = WeightQuant(layer.weight, a.weight_bits, a.symmetric, a.granularity, a.group_size)
            aq = ActQuant(a.act_bits, a.act_symmetric, a.t_intervals, a.percentile, clock, self.key, a.calibrate,
                          a.tdq).to(
                layer.weight.device) if a.act_bits else None
            quantise(layer, wq, aq)

    def owns(self, name: str) -> bool:
        return True  # the base's weights are the trained weights

    def merge(self, model: nn.Module) -> None:
        for m in [m for m in model.modules() if isinstance(m, Quantised)]:
            fold(m)
