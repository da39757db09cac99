"""The video form of our DiT: spatio-temporal patches, 3-D sin-cos positions, full or factorized attention.

``model(x_t [B, T, C, H, W], t [B], cond) -> [B, T, C_out, H, W]``; any T divisible by ``temporal_patch`` and H, W
divisible by ``patch_size``. Conditioning (timestep, class label, caption) is the image DiT's: one vector per sample,
broadcast over all T'·H'·W' tokens, with the same adaLN-Zero / adaLN-single modulation and caption cross-attention.

Trunk contract (same calls as the image DiT, so pipeline cuts, activation checkpointing and FSDP see one
``self.blocks`` of blocks taking only tensors): tokens travel as ``[B, T', S, D]`` with S = H'·W', so each block
reads the frame count from its input.

    x, c, mod, text, text_mask = model.embed(x_t, t, cond)        # x: [B, T', S, D]
    for block in model.blocks: x = block(x, mod, text, text_mask)
    out = model.final(x, c, grid=x_t.shape[-2:])                  # [B, T, C_out, H, W]

Attention (``attention``):
  * ``"full"``: joint space-time self-attention over all T'·S tokens (ViViT model 1; Arnab et al. 2021,
    "ViViT: A Video Vision Transformer", arXiv:2103.15691, Sec. 3.3).
  * ``"factorized"``: in every block, spatial self-attention among the S tokens of each frame, then temporal
    self-attention among the T' tokens at each spatial location (ViViT model 3, "factorised self-attention",
    Sec. 3.3; Latte, Ma et al. 2024, "Latte: Latent Diffusion Transformer for Video Generation", arXiv:2401.03048,
    its Variant 3; TimeSformer's "divided attention" in the other order). The temporal attention shares the block's
    (shift1, scale1, gate1) modulation, as Open-Sora's STDiT does, and its output projection starts at zero, so at
    init a factorized block is the image block applied frame by frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.models.dit import (DiT, DiTBlock, DiTConfig, FinalLayer, SelfAttention, _sincos_1d, modulate,
                                  sincos_pos_embed_2d)

ATTENTION = ("full", "factorized")


@dataclass
class VideoDiTConfig(DiTConfig):
    frames: int = 16  # training clip length in model space; any T divisible by temporal_patch runs
    temporal_patch: int = 1
    attention: str = "full"  # "full" | "factorized"

    def __post_init__(self):
        super().__post_init__()

        def bad(key, why):
            raise ConfigError(f"config key 'model.{key}' = {getattr(self, key)!r}: {why}")

        if self.frames <= 0:
            bad("frames", "must be > 0 for a video model")
        if self.temporal_patch <= 0:
            bad("temporal_patch", "must be > 0")
        if self.frames % self.temporal_patch:
            bad("frames", f"must be divisible by model.temporal_patch={self.temporal_patch}")
        if self.attention not in ATTENTION:
            bad("attention", f"must be one of {', '.join(ATTENTION)}")
        if self.hidden_size % 16:
            raise ConfigError(f"config key 'model.args.hidden_size' = {self.hidden_size!r}: must be divisible by 16 "
                              "for a video model (3-D sin-cos position embedding: D/4 time, 3D/4 space)")


def sincos_pos_embed_3d(dim: int, grid_t: int, grid_h: int, grid_w: int, base: int, interp: float = 1.0,
                        device=None) -> torch.Tensor:
    """[grid_t * grid_h * grid_w, dim] fixed 3-D sin-cos position embedding, tokens in (frame, row, col) order.

    Channels [0, dim/4) encode the frame index 0, 1, ..., grid_t - 1 (1-D sin-cos; frames keep unit spacing, so a
    longer clip extends the positions rather than squeezing them); channels [dim/4, dim) are the image DiT's 2-D
    embedding of the spatial grid (``sincos_pos_embed_2d``, stretched onto ``base``). The [time D/4 | space 3D/4]
    layout is that of diffusers' ``get_3d_sincos_pos_embed`` (CogVideoX, Yang et al. 2024, arXiv:2408.06072).
    """
    dim_t = dim // 4
    dim_s = dim - dim_t
    spatial = sincos_pos_embed_2d(dim_s, grid_h, grid_w, base, interp, device)  # [S, 3D/4]
    temporal = _sincos_1d(dim_t, torch.arange(grid_t, dtype=torch.float32, device=device)).float()  # [T', D/4]
    S = spatial.shape[0]
    emb = torch.cat([temporal[:, None].expand(grid_t, S, dim_t), spatial[None].expand(grid_t, S, dim_s)], dim=-1)
    return emb.reshape(grid_t * S, dim)  # [T'*S, D]


class VideoDiTBlock(DiTBlock):
    """The image ``DiTBlock`` on tokens [B, T', S, D]; attention "full" (over T'·S) or "factorized" (spatial within
    each frame, then temporal across frames at each location, both gated by gate1):

        x += g1 * SpatialAttn(mod(LN(x)));  x += g1 * TemporalAttn(mod(LN(x)));  x += CrossAttn;  x += g2 * MLP
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, modulation: str, cross: bool, attention: str):
        super().__init__(dim, heads, mlp_ratio, modulation, cross)
        self.attention = attention
        self.temporal_attn = SelfAttention(dim, heads) if attention == "factorized" else None

    def forward(self, x: torch.Tensor, mod: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, S, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod_params(mod)[:, :, None].chunk(6, dim=1)  # [B,1,1,D]
        h = modulate(self.norm1(x), shift1, scale1)  # [B, T', S, D]
        if self.temporal_attn is None:
            a = self.attn(h.reshape(B, T * S, D)).view(B, T, S, D)  # joint space-time
        else:
            a = self.attn(h.reshape(B * T, S, D)).view(B, T, S, D)  # spatial: the S tokens of one frame
        x = x + gate1 * a  # [B, T', S, D]
        if self.temporal_attn is not None:
            h = modulate(self.norm1(x), shift1, scale1).transpose(1, 2).reshape(B * S, T, D)  # [B*S, T', D]
            a = self.temporal_attn(h).view(B, S, T, D).transpose(1, 2)  # temporal: one location's T' tokens
            x = x + gate1 * a  # [B, T', S, D]
        if self.cross_attn is not None:
            x = x + self.cross_attn(x.reshape(B, T * S, D), text, text_mask).view(B, T, S, D)  # [B, T', S, D]
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, T', S, D]
        return x


class VideoDiT(DiT):
    """``model(x_t [B,T,C,H,W], t [B] in [0,1], cond) -> [B, T, C_out, H, W]``; ``cond`` as for ``DiT``.

    Patches are ``temporal_patch x patch_size x patch_size`` (a Conv3d with kernel = stride); the final layer
    predicts ``temporal_patch * p * p * C_out`` values per token. Not exportable to diffusers (image classes only).
    """

    config_class = VideoDiTConfig

    def make_patch_embed(self) -> nn.Module:
        cfg = self.config
        k = (cfg.temporal_patch, cfg.patch_size, cfg.patch_size)
        return nn.Conv3d(cfg.in_channels, cfg.hidden_size, k, stride=k)

    def make_block(self) -> nn.Module:
        cfg = self.config
        return VideoDiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.mod_type, cross=cfg.text_dim > 0,
                             attention=cfg.attention)

    def make_final_layer(self) -> nn.Module:
        cfg = self.config
        return FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.temporal_patch * cfg.out_ch, cfg.mod_type)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The image DiT's init (the Conv3d kernel as a linear layer over flattened patches), plus a zero output
        projection for every temporal attention: at init a factorized block acts frame by frame."""
        super().init_weights()
        for block in self.blocks:
            if block.temporal_attn is not None:
                nn.init.zeros_(block.temporal_attn.proj.weight)
                nn.init.zeros_(block.temporal_attn.proj.bias)

    def pos_embed(self, grid_t: int, grid_h: int, grid_w: int, device) -> torch.Tensor:
        cfg = self.config
        return sincos_pos_embed_3d(cfg.hidden_size, grid_t, grid_h, grid_w, cfg.image_size // cfg.patch_size,
                                   cfg.pos_interp_scale, device)  # [T'*S, D]

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict):
        """-> (tokens [B, T', S, D], c [B, D], mod, text [B, L, D] | None, text_mask [B, L] | None)."""
        cfg = self.config
        if x_t.ndim != 5:
            raise ValueError(f"video DiT input must be [B, T, C, H, W], got shape {tuple(x_t.shape)}")
        _, T, _, H, W = x_t.shape
        pt, p = cfg.temporal_patch, cfg.patch_size
        if T % pt or H % p or W % p:
            raise ValueError(f"video DiT input of {T} frames of {H}x{W} is not divisible by "
                             f"temporal_patch={pt} x patch_size={p}")
        x = self.patch_embed(x_t.transpose(1, 2))  # [B, D, T', H', W']
        gt, gh, gw = x.shape[2:]
        x = x.flatten(3).permute(0, 2, 3, 1)  # [B, T', S, D], S = H'W'
        x = (x + self.pos_embed(gt, gh, gw, x.device).view(gt, gh * gw, -1)[None]).to(x.dtype)  # [B, T', S, D]
        return (x, *self.condition(t, cond))

    def final(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Final layer + unpatchify: [B, T', S, D] -> [B, T, C_out, H, W]; ``grid`` = (H, W) as for the image DiT
        (T' is read from the tokens)."""
        p, pt, C = self.config.patch_size, self.config.temporal_patch, self.config.out_ch
        B, gt, S, D = x.shape
        h, w = grid[0] // p, grid[1] // p
        x = self.final_layer(x.reshape(B, gt * S, D), c)  # [B, N, pt*p*p*C]
        x = x.reshape(B, gt, h, w, pt, p, p, C).permute(0, 1, 4, 7, 2, 5, 3, 6)  # [B, T', pt, C, h, p, w, p]
        return x.reshape(B, gt * pt, C, h * p, w * p)  # [B, T, C, H, W]

    # forward is DiT.forward: embed -> blocks -> final(x, c, x_t.shape[-2:])

    def _no_diffusers(self, what: str):
        from difftrain.models.dit_export import ExportError

        return ExportError(f"cannot {what} (model.frames={self.config.frames}): diffusers' DiTTransformer2DModel "
                           "and PixArtTransformer2DModel are image models, and LatteTransformer3DModel's layers are "
                           "two whole blocks each (docs/ARCHITECTURE.md, Export)")

    def save_diffusers(self, state: dict[str, torch.Tensor], out_dir) -> str:
        raise self._no_diffusers("export a video DiT to diffusers")

    def load_diffusers(self, folder) -> dict[str, torch.Tensor]:
        raise self._no_diffusers("load a diffusers folder into a video DiT")
