"""ControlNet for the text UNet (config ``adapt: [{kind: controlnet}]`` on a ``UNet-*`` model): diffusers'
``ControlNetModel`` (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv
2302.05543, Sec. 3.2 and Fig. 3), built by ``ControlNetModel.from_unet`` from the base UNet (its encoder: conv_in,
the time embedding, the down blocks and the mid block are copied), so the branch is the stock class and exports as
a ``ControlNetModel`` folder that ``StableDiffusionControlNetPipeline`` serves.

The control image enters in *pixels* in [0, 1] at the training images' resolution, as diffusers' ControlNet
pipelines feed it (``VaeImageProcessor(do_normalize=False)``): the branch's ``controlnet_cond_embedding`` (four
convolutions in the paper) downsamples it by the VAE's factor f, so its ``conditioning_embedding_out_channels`` are
the first log2(f) + 1 of diffusers' default (16, 32, 96, 256) (f = 8: the default; a pixel-space UNet: one conv).
With c the embedded control and Z the zero-initialised 1x1 convolutions (``controlnet_down_blocks``,
``controlnet_mid_block``), the branch computes, with its own copy E' of the encoder,

    r_k = s * Z_k(E'_k(conv_in'(x_t) + c)),   r_mid = s * Z_mid(M'(...))        (Zhang et al., Eq. 2)

and the base adds r_k to each skip it keeps for the decoder (diffusers' ``down_block_additional_residuals``) and
r_mid to the mid block's output (``mid_block_additional_residual``); s is ``cond["control_scale"]``. Z = 0 at
init, so a fresh ControlNet, s = 0 and no control image all give the base exactly.

The branch runs the ``ControlNetModel``'s own modules in our UNet's threaded order (``UNet.embed``,
``run_block``'s calls), so the caption mask reaches its cross-attention as it reaches the base's
(``encoder_attention_mask``). Diffusers' ``ControlNetModel.forward`` has no caption mask (its ``attention_mask``
goes to the self-attention), and ``StableDiffusionControlNetPipeline`` passes none to either model: served through
the stock pipeline, outputs equal ours where captions are unpadded (the test), as for the UNet's own export.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from difftrain.config import ConfigError

EMBED_CHANNELS = (16, 32, 96, 256)  # diffusers' conditioning_embedding_out_channels for f = 8


def embed_channels(factor: int, key: str) -> tuple[int, ...]:
    """``conditioning_embedding_out_channels`` that downsample pixels by ``factor`` (the VAE's; 1 in pixel
    space): each entry after the first halves the resolution."""
    k = int(round(math.log2(factor))) if factor >= 1 else -1
    if k < 0 or 2 ** k != factor or k >= len(EMBED_CHANNELS):
        raise ConfigError(f"config key '{key}.kind' = controlnet: the UNet's ControlNet embeds control pixels "
                          f"downsampled by the VAE's factor, which must be 1, 2, 4 or 8, got {factor} "
                          "(data.image_size / model.image_size)")
    return EMBED_CHANNELS[:k + 1]


class UNetControlBranch(nn.Module):
    """A ``ControlNetModel`` (``net``) as the branch a ControlNet adds to a UNet (``model.control``, called by
    ``UNet.forward``). ``space = "pixels"``: ``cond["control"]`` is the control image in [0, 1] at pixel size."""

    space = "pixels"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def from_unet(cls, model: nn.Module, factor: int, channels: int, key: str) -> "UNetControlBranch":
        from diffusers import ControlNetModel, UNet2DConditionModel

        if not isinstance(model.inner, UNet2DConditionModel):
            raise ConfigError(f"config key '{key}.kind' = controlnet: diffusers' ControlNetModel pairs with the "
                              "text UNet (UNet2DConditionModel), not a class-conditional or unconditional UNet")
        if model.config.guidance_embed:
            raise ConfigError(f"config key '{key}.kind' = controlnet: diffusers' ControlNetModel has no guidance "
                              "input (time_cond_proj_dim), so it cannot pair with model.args.guidance_embed")
        device = next(model.parameters()).device
        with torch.device(device):
            net = ControlNetModel.from_unet(model.inner, conditioning_embedding_out_channels=embed_channels(factor, key),
                                            conditioning_channels=channels)
        return cls(net)

    def residuals(self, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict, state: dict):
        """(down residuals, one per skip; mid residual) for ``cond["control"]`` at ``cond["control_scale"]``, or
        None without a control image. ``state``: the base's stem output (its caption context and mask)."""
        control = cond.get("control")
        if control is None:
            return None
        net, scale = self.net, cond.get("control_scale", 1.0)
        emb = unet.embed(net, x_t, t, cond)  # [B, 4*C0], the branch's own time embedding
        h = net.conv_in(x_t) + net.controlnet_cond_embedding(control.to(x_t.dtype))  # [B, C0, H, W]
        skips = (h,)
        attn = dict(encoder_hidden_states=state["context"], encoder_attention_mask=state["context_bias"]) \
            if unet.text else {}

        def kw(block) -> dict:  # as UNet.run_block: captions only into cross-attention blocks
            return attn if getattr(block, "has_cross_attention", False) else {}

        for block in net.down_blocks:
            h, res = block(hidden_states=h, temb=emb, **kw(block))
            skips = skips + tuple(res)
        h = net.mid_block(h, emb, **kw(net.mid_block))
        down = tuple(scale * z(s) for s, z in zip(skips, net.controlnet_down_blocks, strict=True))
        return down, scale * net.controlnet_mid_block(h)
