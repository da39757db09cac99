"""QALoRA: LoRA on the quantised base (``adapt: [{kind: qat, ...}, {kind: lora, ...}]``), EfficientDM's
quantisation-aware low-rank adapter (He et al. 2023, arXiv:2310.03270, Sec. 3.2): the adapter's update is added to
the full-precision weight *before* the weight quantiser,

    y = Q_w(W + (α / r) B A) · Q_a(x) (+ bias),

so that after training the adapter merges into the weight and the layer folds to one integer weight (convert),
which a LoRA added beside a quantised layer (Q_w(W) x + B A x) cannot. B starts at zero, so a fresh QALoRA model is
the naively quantised one. The base weight W stays frozen (LoRA's rule); the quantisers' step sizes and zero
points train with the adapters, as in EfficientDM. The adapter sees the layer's input unquantised by no dropout
(merged into W there is no separate adapter input), so LoRA ``dropout`` and DoRA are refused with qat
(``QAT.context``).

Merge order (``merge_changes`` folds in reverse): the LoRA merges into W first (peft's ``merge``), then QAT's
convert folds Q_w(W + ΔW) to the integer grid: the converted model equals the prepared one.
"""
from __future__ import annotations

import torch
from torch import nn

from difftrain.quant.modules import Quantised

_CLASSES: dict[type, type] = {}


class QALoRA:
    """Mixed into peft's LoRA ``Linear`` wrapping a :class:`~difftrain.quant.modules.Quantised` layer: the active
    adapters' ΔW (peft's ``get_delta_weight``) joins the base weight inside the quantiser."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged:
            return base(x)
        w = base.weight
        for name in self.active_adapters:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).to(w.dtype)
        return base.quantised_forward(x, w)


def attach(model: nn.Module) -> int:
    """Every peft LoRA layer of ``model`` whose base is quantised becomes a QALoRA layer (class swap in place, as
    ``modules.quantise`` does), and the quantisers' parameters train again after LoRA froze everything but its
    adapters. Returns the number of layers."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for m in model.modules():
        if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), Quantised) and not isinstance(m, QALoRA):
            cls = type(m)
            if cls not in _CLASSES:
                _CLASSES[cls] = type(f"QALoRA{cls.__name__}", (QALoRA, cls), {})
            m.__class__ = _CLASSES[cls]
            n += 1
    for m in model.modules():
        if isinstance(m, Quantised):
            for q in (m.weight_quant, m.act_quant):
                if q is not None:
                    q.requires_grad_(True)
    return n
