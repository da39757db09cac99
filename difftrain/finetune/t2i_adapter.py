"""T2I-Adapter for our image DiT (config ``adapt: [{kind: t2i_adapter, blocks: [...], channels: C}]``): Mou et al.
2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for Text-to-Image Diffusion Models", arXiv
2302.08453, Sec. 3.2: a small network of the condition image, F_c = F_AD(C), whose features are added to the frozen
backbone's intermediate features, F^_enc^i = F_enc^i + F_c^i. The paper's adapter pixel-unshuffles the image to the
UNet's first feature grid and runs a pyramid of convolutional residual blocks, one level per encoder scale. A DiT has
a single token grid, so the pyramid's levels become depths here: the control image c (``cond["control"]``, the shape
of ``x_t``: a latent for a latent model) is pixel-unshuffled with the DiT's patch size p onto the token grid (the
DiT's patch geometry, not its trainable patch embedding), and the j-th residual stage feeds the j-th receiving block
k_j (``blocks``; default the first half, the counterpart of the UNet encoder the paper feeds):

    F_0 = W_in * unshuffle_p(c);   F_j = F_{j-1} + W2_j ReLU(W1_j * F_{j-1})   (W_in, W1_j 3x3 convs, W2_j 1x1)
    x_{k_j} <- x_{k_j} + s * Z_j F_j   before base block k_j, for j = 1..K (the features as [B, N, C] tokens)

with C = ``channels`` (default D / 4) and Z_j a linear C -> D. Z_j is zero-initialised (as ControlNet's zero
convolutions; the paper's adapter has no zero layer), so a fresh adapter is the base model exactly, and
s = 0 (``cond["control_scale"]``, 1 in training) or no control image is the base (REFERENCES G). The features do not
depend on t or the prompt (the paper runs the adapter once per image); the DiT computes them in each forward: per
token, 10 C^2 + C D multiply-adds a stage, at the defaults (C = D / 4, depth / 2 stages) about one base block's
12 D^2 (its attention and MLP projections).

The base is frozen; the adapter trains (``adapter.*`` keys, 2.4% of DiT-XL/2 at the defaults). It does not fold
into the base: :meth:`T2IAdapter.merge` leaves it in place (served beside the base, like a ControlNet branch, with
which it composes: each reads ``cond["control"]``). ``difftrain export`` writes it under our own keys to
``DIR/t2i_adapter/`` (:func:`export_adapter`, through ``finetune/served.py``), which ``difftrain sample DIR --control`` reads back (:func:`load_adapter`);
diffusers' ``T2IAdapter`` pairs with its UNets' encoder scales, not with a PixArt transformer, so no diffusers layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difftrain.config import ConfigError, identity
from difftrain.finetune.change import Change

OURS = "difftrain_t2i_adapter"  # DIR/t2i_adapter/OURS.safetensors + OURS.json (the args) in an export


@dataclass
class T2IAdapterArgs:
    blocks: list = identity([])  # indices of the base blocks that receive a feature; []: the first half
    channels: int = identity(0, ge=0)  # the adapter's width C; 0: hidden_size // 4


class _Residual(nn.Module):
    """T2I-Adapter's residual block: F + W2 ReLU(W1 * F), W1 a 3x3 and W2 a 1x1 convolution."""

    def __init__(self, ch: int, device):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, device=device)
        self.conv2 = nn.Conv2d(ch, ch, 1, device=device)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.conv2(F.relu(self.conv1(f)))  # [B, C, h, w]


class AdapterNet(nn.Module):
    """The module a :class:`T2IAdapter` adds to a DiT as ``model.adapter`` (called by ``DiT.forward``)."""

    def __init__(self, blocks: list[int], in_channels: int, patch: int, channels: int, dim: int, device):
        super().__init__()
        self.receivers = list(blocks)  # base block k_j, in order
        self.patch = patch
        self.conv_in = nn.Conv2d(in_channels * patch * patch, channels, 3, padding=1, device=device)
        self.stages = nn.ModuleList(_Residual(channels, device) for _ in blocks)
        self.out = nn.ModuleList(nn.Linear(channels, dim, device=device) for _ in blocks)
        if torch.device(device).type != "meta":
            for lin in self.out:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, cond: dict) -> dict[int, torch.Tensor]:
        """{k_j: s Z_j F_j [B, N, D]} for the control image in ``cond``; {} without one (the base model)."""
        control = cond.get("control")
        if control is None:
            return {}
        scale = cond.get("control_scale", 1.0)
        f = self.conv_in(F.pixel_unshuffle(control.to(self.conv_in.weight.dtype), self.patch))  # [B, C, h, w]
        out = {}
        for k, stage, proj in zip(self.receivers, self.stages, self.out):
            f = stage(f)  # [B, C, h, w]
            out[k] = scale * proj(f.flatten(2).transpose(1, 2))  # [B, N, D], tokens row-major as the DiT's
        return out


class T2IAdapter(Change):
    kind = "t2i_adapter"
    args_class = T2IAdapterArgs
    mergeable = False  # the adapter stays: the served model takes a control image
    reads_control = True

    def receivers(self, model: nn.Module) -> list[int]:
        """The receiving block indices, checked (one-line errors naming the config key)."""
        from difftrain.models.dit import DiT
        from difftrain.models.dit_video import VideoDiT

        if not isinstance(model, DiT) or isinstance(model, VideoDiT):
            raise ConfigError(f"config key '{self.key}.kind' = t2i_adapter: built for the image DiT, not "
                              f"{type(model).__name__}")
        return self.block_indices(len(model.blocks))

    def apply(self, model: nn.Module) -> None:
        blocks = self.receivers(model)
        if getattr(model, "adapter", None) is not None:
            raise ConfigError(f"config key '{self.key}': the model already has a T2I-Adapter (one per model)")
        model.requires_grad_(False)  # the base, and any earlier change, is frozen
        cfg = model.config
        device = next(model.parameters()).device
        model.adapter = AdapterNet(blocks, cfg.in_channels, cfg.patch_size, self.args.channels or cfg.hidden_size // 4,
                                   cfg.hidden_size, device).requires_grad_(True)

    def owns(self, name: str) -> bool:
        return name.startswith("adapter.")

    def merge(self, model: nn.Module) -> None:
        """Nothing folds: the adapter is part of the served model."""


# ------------------------------------------------------------------------------------------------ export
def export_adapter(model, state: dict[str, torch.Tensor], out_dir: str | Path) -> str:
    """Write the T2I-Adapter of ``state`` to ``out_dir/t2i_adapter`` (our keys and its args); returns a line saying
    what was written."""
    from safetensors.torch import save_file

    adapter = model.adapter
    folder = Path(out_dir) / "t2i_adapter"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("adapter.")},
              str(folder / f"{OURS}.safetensors"))
    args = {"blocks": adapter.receivers, "channels": adapter.conv_in.out_channels}
    (folder / f"{OURS}.json").write_text(json.dumps(args))
    return (f"T2I-Adapter (blocks {adapter.receivers}, {args['channels']} channels) in {folder}/{OURS}.safetensors; "
            "no diffusers layout: its T2IAdapter feeds a UNet's encoder scales")


def load_adapter(model, folder: str | Path, device) -> bool:
    """Add the T2I-Adapter an export holds (``folder/t2i_adapter``) to ``model``, with its weights; False when none."""
    from difftrain.models.diffusers_folder import load_safetensors

    meta = Path(folder) / "t2i_adapter" / f"{OURS}.json"
    if not meta.is_file():
        return False
    T2IAdapter(T2IAdapterArgs(**json.loads(meta.read_text()))).apply(model)
    state = load_safetensors(meta.with_suffix(".safetensors"), device=str(device))
    model.adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in state.items()}, strict=True)
    model.requires_grad_(False)
    return True
