"""ControlNet for our image DiT (config ``adapt: [{kind: controlnet, layers: N}]``): PixArt-δ's
ControlNet-Transformer (Chen et al. 2024, arXiv 2401.05252, Sec. 3.3 and Fig. 3), in the layout of diffusers'
PixArt ControlNet research project (``PixArtControlNetAdapterModel``; no core diffusers class pairs with PixArt
blocks). N trainable copies of the base's first N blocks; the control image (a latent for a latent model, pixels in
[-1, 1] otherwise: ``cond["control"]``, the shape of ``x_t``) enters through the base's own patch embedding and
positions P and a zero-initialised projection; each copy's output is added, through a zero-initialised projection,
to the hidden states before the next base block. With x_i the input of base block i (x_1 the output of block 0):

    h_0 = x_1 + W_before P(c);   h_{j+1} = B'_j(h_j);   x_{j+1} <- x_{j+1} + s * W_after_j h_{j+1}   (0 <= j < N)

B'_j starts as a copy of base block j; s is the conditioning scale (``cond["control_scale"]``, 1 in training).
The zero projections make a fresh ControlNet the base model exactly, and s = 0 is the base (REFERENCES G).

The base is frozen (its patch embedding included); the branch trains (``control.*`` keys). A ControlNet does not fold
into the base: :meth:`ControlNet.merge` leaves the branch in place, and the served model takes the control image in
its ``cond``; without one it is the base model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difftrain.config import ConfigError, identity
from difftrain.finetune.change import Change


@dataclass
class ControlNetArgs:
    layers: int = identity(0, ge=0)  # N copied blocks (at most depth - 1); 0: half the depth (PixArt-δ: 13 of 28)


class ControlBranch(nn.Module):
    """The trainable branch a :class:`ControlNet` adds to a DiT as ``model.control`` (called by ``DiT.forward``).
    ``space = "latents"``: ``cond["control"]`` is the control image as the model reads images (VAE latents)."""

    space = "latents"

    def __init__(self, blocks: list[nn.Module], dim: int, device: torch.device):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks)
        self.before_proj = nn.Linear(dim, dim, device=device)
        self.after_proj = nn.ModuleList(nn.Linear(dim, dim, device=device) for _ in blocks)
        if device.type != "meta":
            for lin in (self.before_proj, *self.after_proj):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def tokens(self, model: nn.Module, cond: dict) -> torch.Tensor | None:
        """P(c): the control image through the base's patch embedding and positions, or None without one."""
        control = cond.get("control")
        return None if control is None else model.tokens(control)

    def forward(self, j: int, x: torch.Tensor, h: torch.Tensor, mod, text, text_mask, scale: float = 1.0):
        """Copy j before base block j + 1: -> (x + s W_after_j h', h')."""
        if j == 0:
            h = x + self.before_proj(h)  # [B, N, D]
        h = self.blocks[j](h, mod, text, text_mask)  # [B, N, D]
        return x + scale * self.after_proj[j](h), h


class ControlNet(Change):
    kind = "controlnet"
    args_class = ControlNetArgs
    mergeable = False  # the branch stays: the served model takes a control image
    reads_control = True

    pixels: tuple[int, int] = (1, 3)  # (the VAE's downsampling factor, the data's channels): the UNet's branch

    def context(self, cfg) -> None:
        if cfg.model.image_size and cfg.data.image_size:
            self.pixels = (max(1, cfg.data.image_size // cfg.model.image_size), cfg.data.channels)

    def layers(self, model: nn.Module) -> int:
        from difftrain.models.dit_video import VideoDiT

        if isinstance(model, VideoDiT):
            raise ConfigError(f"config key '{self.key}.kind' = controlnet: built for the image DiT and the text UNet, "
                              f"not {type(model).__name__}")
        depth = len(model.blocks)
        n = self.args.layers or max(1, depth // 2)
        if not 1 <= n <= depth - 1:
            raise ConfigError(f"config key '{self.key}.layers' = {self.args.layers}: the branch feeds base blocks 1.."
                              f"N, so N must be at most depth - 1 = {depth - 1}")
        return n

    def apply(self, model: nn.Module) -> None:
        from difftrain.models.unet import UNet

        if isinstance(model, UNet):
            if self.args.layers:
                raise ConfigError(f"config key '{self.key}.layers' = {self.args.layers}: the UNet's ControlNet copies "
                                  "its whole encoder (diffusers' ControlNetModel); leave layers unset")
            from difftrain.finetune.controlnet_unet import UNetControlBranch

            branch = UNetControlBranch.from_unet(model, *self.pixels, self.key)
        else:
            n = self.layers(model)
            device = next(model.parameters()).device
            branch = ControlBranch(list(model.blocks[:n]), model.config.hidden_size, device)
        model.requires_grad_(False)  # the base, and any earlier change, is frozen
        model.control = branch.requires_grad_(True)

    def owns(self, name: str) -> bool:
        return name.startswith("control.")

    def merge(self, model: nn.Module) -> None:
        """Nothing folds: the branch is part of the served model."""


def control_space(cfg) -> str:
    """Where a run's control images enter its model: ``"pixels"`` in [0, 1] for the UNet's ControlNet (diffusers'
    ``ControlNetModel`` embeds pixels itself), ``"latents"`` otherwise (encoded like the training images)."""
    from difftrain.models import registry

    return "pixels" if registry.arch_config(cfg.model, text_dim=1)[0] == "unet" else "latents"


def to_control(unit: torch.Tensor, space: str, vae) -> torch.Tensor:
    """Control images in [-1, 1] [B, C, H, W] -> the model's ``cond["control"]`` for ``space``
    (:func:`control_space`): encoded by the run's VAE, or pixels in [0, 1]."""
    return (unit + 1) / 2 if space == "pixels" else vae.encode(unit)


def control_input(path: str, pixels: tuple[int, int], channels: int, vae, device, space: str = "latents") -> torch.Tensor:
    """A control image file as the model reads it: decoded as the loader decodes images (``open_image``: PNG, JPEG,
    WEBP, never unpickled, size-checked), ``channels`` 3 or 1, resized to ``pixels`` = (H, W), in [-1, 1], then
    :func:`to_control` for ``space`` -> [1, C, h, w]; a file that does not decode is a one-line error naming it."""
    import numpy as np
    from PIL import Image

    from difftrain.data.decode import SkipSample, open_image
    from difftrain.data.images import to_mode, to_unit

    try:
        img = open_image(Path(path).read_bytes(), 0, f"--control '{path}'")
    except OSError as e:
        raise ConfigError(f"--control '{path}' cannot be read ({type(e).__name__}: {e})") from None
    except SkipSample as e:
        raise ConfigError(str(e)) from None
    img = to_mode(img, channels).resize((pixels[1], pixels[0]), Image.Resampling.BICUBIC)
    a = torch.from_numpy(np.array(img, dtype=np.uint8)).reshape(pixels[0], pixels[1], channels)
    with torch.no_grad():
        return to_control(to_unit(a.permute(2, 0, 1)[None].to(device)), space, vae)
