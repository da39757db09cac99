"""LoRA (Hu et al. 2021) through peft: W x + (alpha / r) B A x on the chosen Linear layers, B zero-initialised (a
fresh adapter leaves the model's output unchanged), A Kaiming-uniform (peft's default); DoRA (Liu et al. 2024) as
an option. The base weights are frozen: no gradient, no optimizer state, no EMA.

``targets`` are groups of layers by role, for our DiTs (image and video) and the UNet (diffusers' names), or
regular expressions matched against whole module names (``re.fullmatch``, as peft does):

* ``attn``: self-attention projections (DiT ``attn.qkv`` / ``attn.proj``; UNet ``to_q/to_k/to_v/to_out.0`` of
  self-attention);
* ``cross_attn``: caption cross-attention (DiT ``cross_attn.q/kv/proj``; UNet ``attn2.*``);
* ``mlp``: the feed-forward layers (DiT ``mlp.fc1/fc2``; UNet ``ff.net.0.proj`` / ``ff.net.2``);
* ``modulation``: the timestep conditioning (DiT ``adaLN`` / adaLN-single ``t_block``; UNet ``time_emb_proj``).

REFERENCES G: diffusers' LoRA targets ``to_q, to_k, to_v, to_out.0``; our fused ``qkv`` carries one LoRA whose
export splits B by rows (a later export part of this issue).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from difftrain.config import ConfigError, identity
from difftrain.finetune.change import Change

GROUPS = {
    "attn": r"(.*\.)?(attn\.(qkv|proj)|attn1\.(to_q|to_k|to_v|to_out\.0)|attentions\.\d+\.(to_q|to_k|to_v|to_out\.0))",
    "cross_attn": r"(.*\.)?(cross_attn\.(q|kv|proj)|attn2\.(to_q|to_k|to_v|to_out\.0))",
    "mlp": r"(.*\.)?(mlp\.(fc1|fc2)|ff\.net\.(0\.proj|2))",
    "modulation": r"(.*\.)?(adaLN\.\d+|t_block\.\d+|time_emb_proj)",
}


@dataclass
class LoRAArgs:
    rank: int = identity(8, ge=1)  # r
    alpha: float = identity(0.0, ge=0.0)  # the scale is alpha / r; 0: alpha = r (scale 1)
    dropout: float = identity(0.0, ge=0.0, lt=1.0)  # on the adapter's input (torch's RNG: not keyed per sample)
    targets: list = identity(["attn", "mlp"])  # groups (attn, cross_attn, mlp, modulation) or module-name regexes
    dora: bool = identity(False)  # weight-decomposed LoRA (DoRA)
    name: str = identity("default")  # the adapter's name (several adapters trained in turn keep their names)


class LoRA(Change):
    kind = "lora"
    args_class = LoRAArgs

    def __init__(self, args, index: int = 0):
        super().__init__(args, index)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):  # a peft adapter name (no dots) and an export folder
            raise ConfigError(f"config key '{self.key}.name' = {args.name!r}: an adapter's name is a peft adapter "
                              "name and its export folder name: letters, digits, '_' and '-' only")

    def layers(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s Linear layers the targets match (each target checked to match one)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        # a Linear, or a layer an earlier adapter wraps (peft adds this adapter to it), never its inner base_layer
        linear = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                  or (isinstance(m, nn.Linear) and not n.endswith(".base_layer") and n not in ("base_layer",))]
        linear = [n for n in linear if ".lora_" not in n]
        return self.chosen_layers(linear, GROUPS, "Linear layer")

    def apply(self, model: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        a = self.args
        cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha or a.rank, lora_dropout=a.dropout, use_dora=a.dora,
                         target_modules=self.layers(model))
        before = {id(p) for p in model.parameters()}
        inject_adapter_in_model(cfg, model, adapter_name=a.name)
        for m in model.modules():  # peft activates the new adapter alone: every adapter of a layer stays active
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(list(m.lora_A))
        for p in model.parameters():  # train this adapter only: the base and any earlier change are frozen
            p.requires_grad_(id(p) not in before)
        from difftrain.quant.qalora import attach

        attach(model)  # on a quantised base (qat before it): QALoRA, the adapter inside the weight quantiser

    def owns(self, name: str) -> bool:
        return any(f".{k}.{self.args.name}." in f".{name}" or name.endswith(f".{k}.{self.args.name}")
                   for k in ("lora_A", "lora_B", "lora_magnitude_vector"))

    def merge(self, model: nn.Module) -> None:
        """Each LoRA layer merged into its base Linear (peft's ``merge``), the Linear put back in its place once every
        adapter it holds is merged."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer) and self.args.name in module.lora_A:
                module.merge(adapter_names=[self.args.name])
                if set(module.merged_adapters) != set(module.lora_A):  # another adapter of this layer merges later
                    continue
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def set_merged(model: nn.Module, merged: bool) -> None:
    """Every LoRA layer of ``model`` merged into its base weight (``W + (alpha / r) B A``, peft's ``merge``: one matmul
    per layer at inference, the adapters kept) or unmerged back (``unmerge``: the base weight restored to rounding,
    the adapters trainable again). :meth:`LoRA.merge` is the one-way fold for serving."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            if merged and not module.merged:
                module.merge()
            elif not merged and module.merged:
                module.unmerge()

