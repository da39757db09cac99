"""Diffusion Transformer: one block type with adaLN modulation, self-attention, optional text cross-attention, MLP.

Structure from DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", Sec. 3.2: patchify,
adaLN-Zero blocks, zero-initialised final layer) and PixArt-α (Chen et al. 2023, "PixArt-α: Fast Training of
Diffusion Transformer", Sec. 2.3: adaLN-single with per-block scale-shift tables, cross-attention to the caption,
caption projection). Numerics (timestep features, position grid, norm eps, mask convention) are chosen so that the
class-conditional form equals diffusers' ``DiTTransformer2DModel`` and the text-conditional form equals its
``PixArtTransformer2DModel`` (see ``dit_export.py``).

The model is written for one device. Its trunk is ``self.blocks`` (an ``nn.ModuleList`` of ``DiTBlock``); a block
takes only tensors ``(x, mod, text, text_mask)`` so a pipeline partitioner can cut the trunk anywhere:

    x, c, mod, text, text_mask = model.embed(x_t, t, cond)
    for block in model.blocks: x = block(x, mod, text, text_mask)
    out = model.final(x, c, grid=x_t.shape[-2:])

Build on the meta device, then ``to_empty`` + ``init_weights()`` (``registry.materialize`` does both).
The video form (``dit_video.VideoDiT``, ``model.frames > 0``) subclasses ``DiT`` through its ``make_*`` factories.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difftrain.config import ConfigError

T_SCALE = 1000.0  # the network sees t * 1000 (diffusers' timestep scale), t in [0, 1], 1 = noise
T_FREQ_DIM = 256  # width of the sinusoidal timestep features (DiT and PixArt-α)
NORM_EPS = 1e-6


@dataclass
class DiTConfig:
    image_size: int  # model-space side length (latent size with a VAE); base grid of the position embedding
    in_channels: int
    num_classes: int  # 0 = no class conditioning; label ``num_classes`` is the null label
    text_dim: int  # 0 = no text; else width of the text encoder states
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    modulation: str = "auto"  # "zero" (DiT adaLN-Zero) | "single" (PixArt-α adaLN-single) | "auto"
    out_channels: int = 0  # 0 = in_channels
    pos_interp_scale: float = 1.0  # PixArt-α "interpolation_scale": position grid divided by this
    guidance_embed: bool = False  # also embed cond["guidance"] (the CFG scale w, [B]); not exportable to diffusers

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"config key 'model.args.{key}' = {getattr(self, key)!r}: {why}")

        for key in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, key) <= 0:
                bad(key, "must be > 0")
        for key in ("num_classes", "text_dim", "out_channels"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.modulation not in ("auto", "zero", "single"):
            bad("modulation", "must be one of auto, zero, single")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            bad("hidden_size", "must be divisible by 4 (2-D sin-cos position embedding)")
        if self.image_size % self.patch_size:
            bad("image_size", f"must be divisible by patch_size={self.patch_size}")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", "must be > 0")
        if self.pos_interp_scale <= 0:
            bad("pos_interp_scale", "must be > 0")
        if not isinstance(self.guidance_embed, bool):
            bad("guidance_embed", "must be true or false")

    @property
    def mod_type(self) -> str:
        """Resolved modulation: "single" if text is present, else "zero", unless set explicitly."""
        if self.modulation == "auto":
            return "single" if self.text_dim > 0 else "zero"
        return self.modulation

    @property
    def out_ch(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def t_freq_shift(self) -> int:
        """Frequency shift of the timestep features: 1 in diffusers' DiT embedder, 0 in its PixArt one."""
        return 1 if self.mod_type == "zero" else 0


# ---------------------------------------------------------------------------------------- fixed embeddings
def timestep_features(t_scaled: torch.Tensor, dim: int = T_FREQ_DIM, shift: float = 0.0) -> torch.Tensor:
    """[B] -> [B, dim]: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (dim/2 - shift)) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_scaled.device)
                      / (half - shift))  # [dim/2]
    args = t_scaled[:, None].float() * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] -> [M, dim]: [sin(p w_i), cos(p w_i)], w_i = 10000^(-2i/dim), evaluated in float64."""
    f64 = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=f64, device=pos.device) / (dim / 2.0))  # [dim/2]
    out = pos.to(f64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, dim]


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base: int, interp: float = 1.0,
                        device=None) -> torch.Tensor:
    """[grid_h * grid_w, dim] fixed 2-D sin-cos position embedding, tokens in row-major (row, col) order.

    The first half of the channels encodes the column, the second half the row (MAE / DiT layout). Each axis is
    stretched onto ``base`` positions and divided by ``interp`` (PixArt-α multi-aspect convention): at the native
    grid (grid = base, interp = 1) the positions are 0, 1, ..., base - 1 exactly as in DiT.
    """
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) / (grid_h / base) / interp  # [gh]
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) / (grid_w / base) / interp  # [gw]
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")  # [gh, gw] each
    emb = torch.cat([_sincos_1d(dim // 2, cc.reshape(-1)), _sincos_1d(dim // 2, rr.reshape(-1))], dim=1)
    return emb.float()  # [gh*gw, dim]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------- layers
class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t*1000 -> MLP (DiT Sec. 3.2, "timestep t ... 256-dim frequency embedding")."""

    def __init__(self, hidden: int, freq_shift: float):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(T_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t.float() * T_SCALE, T_FREQ_DIM, self.freq_shift)  # [B, 256]
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # [B, D]


class GuidanceEmbedder(TimestepEmbedder):
    """The CFG scale w [B] as an input (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one: a
    w-conditioned student, w Fourier-embedded and fed in like the timestep; LCM, Luo et al. 2023, the same for its
    w-conditioned consistency model): sinusoidal features of (w − 1)·1000 -> MLP, added to the timestep embedding.
    w − 1 is the w' of Meng et al. / LCM (our w = 1 is the plain conditional model), the value diffusers' LCM
    pipeline embeds. The MLP's last layer is zero-initialised (``DiT.init_weights``), so the model starts as the
    same model without it."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return super().forward(w.float() - 1.0)  # [B, D]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v (rows in that order; export splits them)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unbind (not permute + unpack): autograd then writes the three grads straight into qkv's layout. Shapes are
        # read from qkv's output: under tensor parallelism it holds this rank's heads (H = heads / tp), and under
        # sequence parallelism every token of x's 1/tp share (parallelism/tensor_parallel.py)
        qkv = self.qkv(x)  # [B, N, 3 H hd]
        B, N, hd = qkv.shape[0], qkv.shape[1], x.shape[-1] // self.heads
        qkv = qkv.view(B, N, 3, -1, hd)  # [B, N, 3, H, hd]
        q, k, v = (u.transpose(1, 2) for u in qkv.unbind(2))  # [B, H, N, hd]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))  # [B, N, D]


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # fused k, v over the projected text states
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        L, hd = text.shape[1], x.shape[-1] // self.heads
        q = self.q(x)  # [B, N, H hd] (H: this rank's heads under TP; N: every token under SP)
        B, N = q.shape[:2]
        q = q.view(B, N, -1, hd).transpose(1, 2)  # [B, H, N, hd]
        k, v = (u.transpose(1, 2) for u in self.kv(text).view(B, L, 2, -1, hd).unbind(2))  # [B, H, L, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])  # [B, H, N, hd]
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))  # [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x += g1 * Attn(mod(LN(x))); x += CrossAttn(x, text); x += g2 * MLP(mod(LN(x))).

    ``mod`` is the conditioning vector c [B, D] for adaLN-Zero (the block owns its modulation MLP, DiT Sec. 3.2)
    or the shared projection t0 [B, 6D] for adaLN-single (the block adds its own table, PixArt-α Eq. 3 / Sec. 2.3).
    As in PixArt-α, no normalisation is applied before cross-attention.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, modulation: str, cross: bool):
        super().__init__()
        self.modulation = modulation
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if modulation == "zero":
            self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        else:
            self.scale_shift_table = nn.Parameter(torch.empty(6, dim))

    def mod_params(self, mod: torch.Tensor) -> torch.Tensor:
        """(shift1, scale1, gate1, shift2, scale2, gate2) as [B, 6, D] from c [B, D] or t0 [B, 6D]."""
        B, D = mod.shape[0], self.norm1.normalized_shape[0]
        if self.modulation == "zero":
            return self.adaLN(mod).view(B, 6, D)  # [B, 6, D]
        return self.scale_shift_table[None] + mod.view(B, 6, D)  # [B, 6, D]

    def forward(self, x: torch.Tensor, mod: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod_params(mod).chunk(6, dim=1)  # each [B, 1, D]
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))  # [B, N, D]
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, text, text_mask)  # [B, N, D]
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # [B, N, D]
        return x


class FinalLayer(nn.Module):
    """LN -> modulate by c -> linear to p*p*C_out per token (DiT Sec. 3.2; PixArt-α uses a 2-row table)."""

    def __init__(self, dim: int, patch: int, out_ch: int, modulation: str):
        super().__init__()
        self.modulation = modulation
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        if modulation == "zero":
            self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        else:
            self.scale_shift_table = nn.Parameter(torch.empty(2, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.modulation == "zero":
            shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        else:
            shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p*p*C_out]


# ---------------------------------------------------------------------------------------- model
class DiT(nn.Module):
    """``model(x_t [B,C,H,W], t [B] in [0,1], cond) -> [B, C_out, H, W]``; any H, W divisible by the patch size.

    ``cond`` keys: ``class_labels`` LongTensor [B] (``num_classes`` = null label) when ``num_classes > 0``;
    ``text_states`` [B, L, text_dim] and ``text_mask`` [B, L] bool (True = real token) when ``text_dim > 0``;
    ``guidance`` float [B] (the CFG scale w, ``GuidanceEmbedder``) when ``guidance_embed``.
    """

    # parameters an architecture flag adds, zero-initialised so the model starts as the one without it: weights
    # of that model (a flagless teacher) load with these left at their init (train/build.py)
    optional_keys = ("g_embed.",)

    config_class = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D, mod = config.hidden_size, config.mod_type
        self.patch_embed = self.make_patch_embed()
        self.t_embed = TimestepEmbedder(D, config.t_freq_shift)
        self.y_embed = nn.Embedding(config.num_classes + 1, D) if config.num_classes > 0 else None
        self.text_embed = None
        if config.text_dim > 0:  # caption projection (PixArt-α Sec. 2.3), tanh-GELU MLP
            self.text_embed = nn.Sequential(nn.Linear(config.text_dim, D), nn.GELU(approximate="tanh"),
                                            nn.Linear(D, D))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D)) if mod == "single" else None
        self.blocks = nn.ModuleList(self.make_block() for _ in range(config.depth))
        self.final_layer = self.make_final_layer()
        # registered last: the flag adds keys after the others and leaves their init (under a seed) unchanged
        self.g_embed = GuidanceEmbedder(D, config.t_freq_shift) if config.guidance_embed else None
        if self.patch_embed.weight.device.type != "meta":
            self.init_weights()  # built directly on a real device: usable at once; on meta, materialize() does it

    # module factories, in construction order (a subclass such as the video DiT swaps these three)
    def make_patch_embed(self) -> nn.Module:
        cfg = self.config
        return nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def make_block(self) -> nn.Module:
        cfg = self.config
        return DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.mod_type, cross=cfg.text_dim > 0)

    def make_final_layer(self) -> nn.Module:
        cfg = self.config
        return FinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_ch, cfg.mod_type)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT's init for adaLN-Zero (Peebles & Xie 2023, Sec. 3.2 and their ``initialize_weights``); PixArt-α's for
        adaLN-single (tables ~ N(0, 1/D), t_block ~ N(0, 0.02)). Both zero-init the output projection (output is
        exactly 0 at init) and the cross-attention output projection (PixArt-α). The guidance embedder is
        initialised last, with a zero output layer: the same seed gives the other weights of the model without it."""
        D = self.config.hidden_size
        skip = set(map(id, self.g_embed.modules())) if self.g_embed is not None else set()
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in skip:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over flattened patches
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        if self.text_embed is not None:
            nn.init.normal_(self.text_embed[0].weight, std=0.02)
            nn.init.normal_(self.text_embed[2].weight, std=0.02)
        if self.t_block is not None:
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in self.blocks:
            if block.modulation == "zero":
                nn.init.zeros_(block.adaLN[1].weight)
                nn.init.zeros_(block.adaLN[1].bias)
            else:
                nn.init.normal_(block.scale_shift_table, std=D ** -0.5)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        fl = self.final_layer
        if fl.modulation == "zero":
            nn.init.zeros_(fl.adaLN[1].weight)
            nn.init.zeros_(fl.adaLN[1].bias)
        else:
            nn.init.normal_(fl.scale_shift_table, std=D ** -0.5)
        nn.init.zeros_(fl.linear.weight)
        nn.init.zeros_(fl.linear.bias)
        if self.g_embed is not None:
            g = self.g_embed.mlp
            nn.init.normal_(g[0].weight, std=0.02)  # as the timestep embedder's
            nn.init.zeros_(g[0].bias)
            nn.init.zeros_(g[2].weight)  # zero output: c is unchanged at init
            nn.init.zeros_(g[2].bias)

    # ------------------------------------------------------------------ stages of the forward pass
    def pos_embed(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        cfg = self.config
        return sincos_pos_embed_2d(cfg.hidden_size, grid_h, grid_w, cfg.image_size // cfg.patch_size,
                                   cfg.pos_interp_scale, device)  # [gh*gw, D]

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict):
        """-> (tokens [B, N, D], c [B, D], mod (c or t0 [B, 6D]), text [B, L, D] | None, text_mask [B, L] | None)."""
        cfg = self.config
        B, _, H, W = x_t.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"DiT input {H}x{W} is not divisible by patch_size={p}")
        return (self.tokens(x_t), *self.condition(t, cond))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + positions: [B, C, H, W] -> [B, N, D], N = (H/p)(W/p)."""
        p = self.config.patch_size
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        return (h + self.pos_embed(x.shape[-2] // p, x.shape[-1] // p, h.device)[None]).to(h.dtype)  # [B, N, D]

    def condition(self, t: torch.Tensor, cond: dict):
        """-> (c [B, D], mod (c or t0 [B, 6D]), text [B, L, D] | None, text_mask [B, L] | None): one conditioning
        vector per sample, whatever the number of tokens."""
        cfg = self.config
        c = self.t_embed(t)  # [B, D]
        if self.g_embed is not None:
            w = cond.get("guidance")
            if w is None:
                raise ValueError("cond['guidance'] is required: the model has guidance_embed=True "
                                 "(the CFG scale w, a float tensor [B])")
            c = c + self.g_embed(torch.as_tensor(w, device=c.device).expand(c.shape[0]))  # [B, D]
        if self.y_embed is not None:
            if cond.get("class_labels") is None:
                raise ValueError(f"cond['class_labels'] is required: the model has num_classes={cfg.num_classes} "
                                 f"(null label = {cfg.num_classes})")
            c = c + self.y_embed(cond["class_labels"])  # [B, D]
        mod = self.t_block(c) if self.t_block is not None else c  # [B, 6D] | [B, D]
        text = text_mask = None
        if self.text_embed is not None:
            for key in ("text_states", "text_mask"):
                if cond.get(key) is None:
                    raise ValueError(f"cond['{key}'] is required: the model has text_dim={cfg.text_dim}")
            text = self.text_embed(cond["text_states"])  # [B, L, D]
            text_mask = cond["text_mask"].bool()  # [B, L]
            # a caption with no real token attends to all positions (as diffusers' -10000 bias does) instead of NaN
            text_mask = text_mask | ~text_mask.any(dim=-1, keepdim=True)  # [B, L]
        return c, mod, text, text_mask

    def final(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Final layer + unpatchify: [B, N, D] -> [B, C_out, H, W] for an input of spatial size ``grid`` = (H, W)."""
        p, C = self.config.patch_size, self.config.out_ch
        h, w = grid[0] // p, grid[1] // p
        x = self.final_layer(x, c)  # [B, N, p*p*C]
        x = x.reshape(x.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
        return x.reshape(x.shape[0], C, h * p, w * p)  # [B, C, H, W]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        cond = cond or {}
        x, c, mod, text, text_mask = self.embed(x_t, t, cond)  # [B, N, D] ...
        branch = getattr(self, "control", None)  # a ControlNet (finetune/controlnet.py), when one is added
        h = branch.tokens(self, cond) if branch is not None else None  # [B, N, D] | None (no control image)
        adapter = getattr(self, "adapter", None)  # a T2I-Adapter (finetune/t2i_adapter.py), when one is added
        feats = adapter(cond) if adapter is not None else {}  # {block i: s F [B, N, D]}; {} without a control image
        for i, block in enumerate(self.blocks):
            if h is not None and 0 < i <= len(branch.blocks):
                x, h = branch(i - 1, x, h, mod, text, text_mask, cond.get("control_scale", 1.0))
            if i in feats:
                x = x + feats[i]  # [B, N, D]
            x = block(x, mod, text, text_mask)  # [B, N, D]
        return self.final(x, c, x_t.shape[-2:])  # [B, C_out, H, W]

    # ------------------------------------------------------------------ diffusers folders
    def save_diffusers(self, state: dict[str, torch.Tensor], out_dir) -> str:
        """Write ``state`` (our keys, e.g. EMA weights) as a diffusers folder; returns the diffusers class name."""
        from difftrain.models.dit_export import export_dit_diffusers

        return export_dit_diffusers(self, state, out_dir)

    def load_diffusers(self, folder) -> dict[str, torch.Tensor]:
        """Our state dict from a diffusers DiT / PixArt folder (safetensors only) whose config matches this model."""
        from difftrain.models.dit_export import load_dit_diffusers

        return load_dit_diffusers(self, folder)
