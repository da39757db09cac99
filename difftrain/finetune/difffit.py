"""DiffFit (Xie et al. 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple
Parameter-Efficient Fine-Tuning", arXiv:2304.06648, Sec. 3.2 and its Algorithm 1): fine-tune a DiT through its bias
terms, its normalisation layers' affine parameters, the class embedding and new per-channel scale factors γ on the
residual branches of some blocks; every other weight is frozen (about 0.12% of DiT-XL/2's parameters train).

    x += gate1 * γ1 ⊙ Attn(mod(LN(x)));   x += γc ⊙ CrossAttn(x, text);   x += gate2 * γ2 ⊙ MLP(mod(LN(x)))

γ starts at 1, so a fresh DiffFit is exactly the base model. Where γ goes (``blocks``, ``scales``): by default on the
self-attention and MLP branches of the first half of the blocks, the placement the paper's ablation of γ's position
found best on DiT-XL/2 (blocks 1-14 of 28); ``blocks`` lists other block indices, ``scales`` adds the caption
cross-attention (a text DiT) or drops a branch (``scales: []`` tunes the biases alone, BitFit). A factorized video
block's temporal attention is part of ``attn`` (its own γ). What trains besides γ, in our blocks:

* every ``bias`` (linear layers, patch embedding, timestep and caption MLPs, adaLN modulation, output layer);
* the adaLN-single tables (PixArt-α's per-block ``scale_shift_table``): that modulation's per-block bias, the
  counterpart of the adaLN-Zero linear's bias that the paper trains;
* a normalisation layer's affine weight where it has one (our DiT's LayerNorms have none, as in DiT);
* the class embedding (``class_embed``; the paper's "class condition module", re-learnt for a new label set).

Merging folds γ into the branch's output projection: γ ⊙ (W h + b) = (diag(γ) W) h + γ ⊙ b on ``attn.proj``,
``temporal_attn.proj``, ``cross_attn.proj`` and ``mlp.fc2``. The adaLN gate multiplies the branch output
elementwise afterwards, so the fold is exact; the merged model has the plain architecture and state-dict keys.

Composition with LoRA (the ``adapt`` order; the later change trains, the earlier is frozen, as ``LoRA.apply`` does):
``[difffit, lora]`` trains LoRA on a DiffFit-tuned model (DiffFit's biases and γ frozen); ``[lora, difffit]`` trains
DiffFit over a frozen LoRA. γ scales the whole branch, a LoRA delta inside it included, so either order merges
exactly: a LoRA output projection under γ has γ folded into its base layer and its ``lora_B`` rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difftrain.config import ConfigError, identity
from difftrain.finetune.change import Change

GAMMA = "difffit_gamma"  # the scale factor's parameter name on a branch module (``blocks.3.attn.difffit_gamma``)
BRANCHES = {"attn": ("attn", "temporal_attn"), "cross_attn": ("cross_attn",), "mlp": ("mlp",)}  # scales -> modules
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclass
class DiffFitArgs:
    blocks: list = identity([])  # indices of the blocks whose branches get γ; []: the first half (the paper's best)
    scales: list = identity(["attn", "mlp"])  # the branches γ scales: attn, cross_attn, mlp
    class_embed: bool = identity(True)  # train the class embedding too (the paper's "class condition module")


class _Scaled:
    """Mixed into a branch module's class: its output times its γ (``[D]``, broadcast over tokens). The class is
    swapped in place (as FSDP2's ``fully_shard`` does) so state-dict keys, LoRA target names and hooks stay put."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return out * getattr(self, GAMMA).to(out.dtype)  # under autocast: the branch's dtype, as without γ


_SCALED: dict[type, type] = {}


def _scaled_class(cls: type) -> type:
    if cls not in _SCALED:
        _SCALED[cls] = type(f"DiffFit{cls.__name__}", (_Scaled, cls), {})
    return _SCALED[cls]


class DiffFit(Change):
    kind = "difffit"
    args_class = DiffFitArgs

    def branches(self, model: nn.Module) -> list[nn.Module]:
        """The branch modules that get γ (``blocks`` x ``scales``), each checked to exist."""
        from difftrain.models.dit import DiT

        if not isinstance(model, DiT):
            raise ConfigError(f"config key '{self.key}.kind' = 'difffit' applies to a DiT (its scale factors sit on "
                              f"transformer blocks' residual branches), not to {type(model).__name__}")
        blocks = self.block_indices(len(model.blocks))
        for s in self.args.scales:
            if s not in BRANCHES:
                raise ConfigError(f"config key '{self.key}.scales': {s!r} is not one of: {', '.join(BRANCHES)}")
        if "cross_attn" in self.args.scales and model.blocks[0].cross_attn is None:
            raise ConfigError(f"config key '{self.key}.scales': 'cross_attn' needs a text-conditional model "
                              "(model.cond=text); this one has no cross-attention")
        out = []
        for b in blocks:
            for s in self.args.scales:
                out += [m for name in BRANCHES[s] if (m := getattr(model.blocks[b], name, None)) is not None]
        return out

    def trains(self, module: nn.Module, name: str) -> bool:
        """Whether ``module``'s own parameter ``name`` is one DiffFit tunes (besides γ)."""
        return (name in ("bias", "scale_shift_table") or (name == "weight" and isinstance(module, NORMS))
                or (self.args.class_embed and name == "weight" and isinstance(module, nn.Embedding)))

    def apply(self, model: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        branches = self.branches(model)
        if any(hasattr(m, GAMMA) for m in branches):
            raise ConfigError(f"config key '{self.key}': the model already has DiffFit scale factors on these "
                              "blocks (one difffit entry per model)")
        for m in branches:
            out = _output(m)
            if isinstance(out, LoraLayer) and any(out.use_dora.values()):
                raise ConfigError(f"config key '{self.key}': DiffFit after a DoRA adapter on a scaled branch does "
                                  "not merge exactly; put difffit before the lora entry")
        model.requires_grad_(False)  # the base and any earlier change are frozen
        for mname, module in model.named_modules():
            if ".lora_" in f".{mname}":
                continue  # an earlier LoRA's own layers stay frozen
            for pname, p in module.named_parameters(recurse=False):
                if self.trains(module, pname):
                    p.requires_grad_(True)
        for m in branches:
            w = _output(m).weight
            m.register_parameter(GAMMA, nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype)))
            m.__class__ = _scaled_class(type(m))

    def owns(self, name: str) -> bool:
        if ".lora_" in f".{name}":
            return False  # a LoRA's own parameters are the LoRA's
        owner, _, leaf = name.rpartition(".")
        owner = owner.rpartition(".")[2]
        return leaf in (GAMMA, "bias", "scale_shift_table") or (
            leaf == "weight" and (owner.startswith("norm") or (self.args.class_embed and owner == "y_embed")))

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """γ folded into each scaled branch's output projection (and into a LoRA on it: its base layer and its
        ``lora_B`` rows), the branch module's own class put back."""
        from peft.tuners.lora import LoraLayer

        for m in [m for m in model.modules() if isinstance(m, _Scaled)]:
            gamma = getattr(m, GAMMA)
            out = _output(m)
            linears = [out.get_base_layer(), *out.lora_B.values()] if isinstance(out, LoraLayer) else [out]
            for lin in linears:  # γ ⊙ (W h + b) = (diag(γ) W) h + γ ⊙ b
                lin.weight.mul_(gamma.to(lin.weight.dtype)[:, None])
                if lin.bias is not None:
                    lin.bias.mul_(gamma.to(lin.bias.dtype))
            m.__class__ = type(m).__bases__[1]  # DiffFitX(_Scaled, X) -> X
            delattr(m, GAMMA)


def _output(branch: nn.Module) -> nn.Module:
    """A branch's output projection, the Linear (or the LoRA layer on it) that γ folds into: ``mlp.fc2``, else
    ``proj`` (self-, temporal and cross-attention)."""
    from difftrain.models.dit import Mlp

    return branch.fc2 if isinstance(branch, Mlp) else branch.proj
