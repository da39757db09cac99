"""UNet backbone: a thin wrapper around diffusers' ``UNet2DConditionModel`` / ``UNet2DModel``.

The diffusers model lives at ``self.inner`` (state-dict keys ``inner.*``), so export is the inner
model's own ``save_pretrained`` and diffusers loads what we write without any key mapping.

Forms (chosen by the registry-set fields of :class:`UNetConfig`):

* ``text_dim > 0``: ``UNet2DConditionModel`` with ``cross_attention_dim = text_dim``; cross-attention
  blocks at levels ``>= attn_from_level`` (the lower resolutions) and in the mid block.
* ``num_classes > 0``: ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``; label
  ``num_classes`` is the null label used for classifier-free guidance.
* otherwise: unconditional ``UNet2DModel``.

Continuous ``t`` in [0, 1] (1 = noise) reaches diffusers' sinusoidal embedding as ``t * 1000``.

``guidance_embed`` (text form only): the CFG scale w is an input, ``cond["guidance"]`` [B], through diffusers'
``time_cond_proj_dim`` (LCM's w embedding, Luo et al. 2023): ``timestep_cond`` = ``guidance_scale_embedding(w - 1)``,
exactly what diffusers' LCM pipelines pass for ``guidance_scale = w``; the projection ``cond_proj`` is zero at init,
so the model starts as the same model without the flag. The exported folder keeps ``time_cond_proj_dim``.

Trunk and skips: ``self.blocks`` lists ``inner.down_blocks``, ``inner.mid_block`` and
``inner.up_blocks`` in execution order. The forward pass is ``stem -> run_block(i) for every i ->
head``, threading a :class:`dict` state through the blocks:

``h`` (activation), ``emb`` (time/label embedding, [B, 4*C0]), ``skips`` (tuple of skip tensors:
``conv_in``'s output, then every down block appends one per resnet plus one per downsampler; every
up block pops ``layers_per_block + 1`` from the end), and for the text form ``context`` ([B, L, D])
and ``context_bias`` ([B, 1, L], 0 = keep, -1e4 = drop). A pipeline stage cut between blocks
sends the whole state (skips included) to the next stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from difftrain.config import ConfigError

_TIME_SCALE = 1000.0  # diffusers' timestep scale for continuous t
GUIDANCE_EMBED_DIM = 256  # time_cond_proj_dim of the LCM-distilled Stable Diffusion UNets
_RESETTABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


@dataclass
class UNetConfig:
    """What the UNet *is*; saved as ``config.json`` (JSON types only)."""

    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 0
    text_dim: int = 0
    block_out_channels: list = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8  # channels per head (for both forms)
    out_channels: int = 0  # 0 = in_channels
    norm_num_groups: int = 8
    attn_from_level: int = 1  # attention at resolution levels >= this (0 = every level)
    guidance_embed: bool = False  # cond["guidance"] (the CFG scale w) via diffusers' time_cond_proj_dim; text form

    def __post_init__(self):
        chans = list(self.block_out_channels)
        self.block_out_channels = chans
        if not chans:
            raise ValueError("UNetConfig.block_out_channels must not be empty")
        for c in chans:
            if c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: width {c} is not divisible by norm_num_groups={self.norm_num_groups}")
            if c % self.attention_head_dim:
                raise ValueError(f"UNetConfig: width {c} is not divisible by attention_head_dim={self.attention_head_dim}")
        if not 0 <= self.attn_from_level <= len(chans):
            raise ValueError(f"UNetConfig.attn_from_level must be in [0, {len(chans)}]")
        if self.num_classes > 0 and self.text_dim > 0:
            raise ValueError("UNetConfig: choose class conditioning (num_classes) or text conditioning (text_dim), not both")
        if self.guidance_embed is not False and (self.guidance_embed is not True or self.text_dim == 0):
            raise ConfigError(f"config key 'model.args.guidance_embed' = {self.guidance_embed!r}: the UNet takes the "
                              "guidance scale only in its text form (diffusers' UNet2DModel has no time_cond_proj_dim)")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


def _block_types(cfg: UNetConfig, attn_down: str, attn_up: str) -> tuple[list[str], list[str]]:
    down = [attn_down if i >= cfg.attn_from_level else "DownBlock2D" for i in range(cfg.levels)]
    up = [attn_up if i >= cfg.attn_from_level else "UpBlock2D" for i in reversed(range(cfg.levels))]
    return down, up


def diffusers_kwargs(cfg: UNetConfig) -> tuple[str, dict]:
    """The diffusers class name and constructor kwargs for ``cfg``."""
    kw = dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels or cfg.in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
    )
    if cfg.text_dim > 0:
        down, up = _block_types(cfg, "CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
        # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads
        # (diffusers issue #2011), so pass heads per level to get `cfg.attention_head_dim` channels each.
        heads = tuple(c // cfg.attention_head_dim for c in cfg.block_out_channels)
        kw.update(down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2DCrossAttn",
                  cross_attention_dim=cfg.text_dim, attention_head_dim=heads)
        if cfg.guidance_embed:
            kw["time_cond_proj_dim"] = GUIDANCE_EMBED_DIM
        return "UNet2DConditionModel", kw
    down, up = _block_types(cfg, "AttnDownBlock2D", "AttnUpBlock2D")
    kw.update(down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=cfg.attention_head_dim,
              add_attention=cfg.attn_from_level < cfg.levels)
    if cfg.num_classes > 0:
        kw["num_class_embeds"] = cfg.num_classes + 1
    return "UNet2DModel", kw


def guidance_scale_embedding(w: torch.Tensor, dim: int = GUIDANCE_EMBED_DIM) -> torch.Tensor:
    """[B] -> [B, dim] float32: [sin(1000 w f_i), cos(1000 w f_i)], f_i = 10000^(-i/(dim/2 - 1)) — diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` (after VDM's ``get_timestep_embedding``), which
    LCM pipelines call with w = guidance_scale - 1."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)  # float32, as diffusers computes it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)  # [dim/2]
    args = (w.float() * 1000.0)[:, None] * freqs[None]  # [B, dim/2]
    return torch.nn.functional.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim % 2))  # [B, dim]


class UNet(nn.Module):
    """``model(x_t [B,C,H,W], t [B] in [0,1], cond) -> [B,C_out,H,W]`` over a diffusers UNet.

    ``cond`` keys: ``"text_states"`` [B, L, D] and optional ``"text_mask"`` [B, L] bool (text form),
    ``"class_labels"`` Long [B] with ``num_classes`` as the null label (class form); ``"guidance"`` float [B]
    (the CFG scale w) with ``guidance_embed``.
    """

    optional_keys = ("inner.time_embedding.cond_proj.",)  # as DiT.optional_keys: the zero-initialised w input

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        import diffusers

        self.config = config
        cls_name, kw = diffusers_kwargs(config)
        self.inner = getattr(diffusers, cls_name)(**kw)
        self.text = config.text_dim > 0

    # ------------------------------------------------------------------ trunk
    @property
    def blocks(self) -> nn.ModuleList:
        """Trunk in order: down blocks, mid block, up blocks (built on the fly, not a registered child,
        so state-dict keys stay ``inner.*``). Use :meth:`replace_block` to swap one."""
        return nn.ModuleList([*self.inner.down_blocks, self.inner.mid_block, *self.inner.up_blocks])

    def _locate(self, i: int) -> tuple[str, int | None]:
        n = self.config.levels
        if i < 0:
            i += 2 * n + 1
        if not 0 <= i <= 2 * n:
            raise IndexError(f"block index {i} out of range for {2 * n + 1} blocks")
        return ("down", i) if i < n else ("mid", None) if i == n else ("up", i - n - 1)

    def _block(self, i: int) -> nn.Module:
        kind, j = self._locate(i)
        return self.inner.mid_block if kind == "mid" else getattr(self.inner, f"{kind}_blocks")[j]

    def replace_block(self, i: int, module: nn.Module | None) -> None:
        """Put ``module`` at trunk position ``i``: an activation-checkpoint wrapper, or ``None`` to drop
        a block that another pipeline stage owns (its keys then leave the state dict)."""
        kind, j = self._locate(i)
        if kind == "mid":
            self.inner.mid_block = module
        else:
            getattr(self.inner, f"{kind}_blocks")[j] = module

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise every parameter as diffusers' constructors do (PyTorch defaults for Linear,
        Conv2d, GroupNorm, LayerNorm, Embedding; diffusers adds no special init for these blocks),
        so a meta-built model matches an eagerly built one in distribution."""
        covered = set()
        proj = self.inner.time_embedding.cond_proj if self.config.guidance_embed else None
        if proj is not None:  # zero (no RNG drawn): the model starts as, and draws the init of, the one without it
            nn.init.zeros_(proj.weight)
            covered.add(id(proj.weight))
        for mod in self.modules():
            if isinstance(mod, _RESETTABLE) and mod is not proj:
                mod.reset_parameters()
                covered.update(id(p) for p in mod.parameters(recurse=False))
        missed = [n for n, p in self.named_parameters() if id(p) not in covered]
        if missed or any(True for _ in self.buffers()):
            raise RuntimeError(f"UNet.init_weights does not know how to initialise {missed[:3]} / buffers")

    # ------------------------------------------------------------------ forward, in pieces
    def stem(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        """Embeddings and ``conv_in``: the state entering block 0."""
        f = 2 ** (self.config.levels - 1)
        if x_t.shape[-1] % f or x_t.shape[-2] % f:
            raise ValueError(f"UNet input {tuple(x_t.shape[-2:])} must be divisible by {f} (levels={self.config.levels})")
        emb = self.embed(self.inner, x_t, t, cond)  # [B, 4*C0]
        h = self.inner.conv_in(x_t)  # [B, C0, H, W]
        state = {"h": h, "emb": emb, "skips": (h,)}
        if self.text:
            mask = cond.get("text_mask")
            ctx = cond["text_states"].to(x_t.dtype)  # [B, L, D]
            state["context"] = ctx
            state["context_bias"] = None if mask is None else ((1.0 - mask.to(x_t.dtype)) * -10000.0).unsqueeze(1)
        return state

    def embed(self, inner: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The time (+ guidance w) (+ class) embedding [B, 4*C0] of ``inner``: this UNet's diffusers model, or a
        ControlNet's ``ControlNetModel`` (the same modules under the same names, its own weights)."""
        steps = (t * _TIME_SCALE).expand(x_t.shape[0])  # [B]
        w_emb = None
        if self.config.guidance_embed:
            w = cond.get("guidance")
            if w is None:
                raise ValueError("cond['guidance'] is required: the model has guidance_embed=True "
                                 "(the CFG scale w, a float tensor [B])")
            w = torch.as_tensor(w, device=x_t.device).expand(x_t.shape[0])
            w_emb = guidance_scale_embedding(w - 1.0).to(x_t.dtype)  # [B, 256], diffusers' timestep_cond
        emb = inner.time_embedding(inner.time_proj(steps).to(x_t.dtype), w_emb)  # [B, 4*C0]
        if inner.class_embedding is not None:
            emb = emb + inner.class_embedding(cond["class_labels"]).to(emb.dtype)
        return emb

    def run_block(self, i: int, state: dict) -> dict:
        """Run trunk block ``i`` on ``state``; returns the new state (skips pushed or popped)."""
        kind, _ = self._locate(i)
        block = self._block(i)
        h, emb, skips = state["h"], state["emb"], state["skips"]
        attn = {}
        if self.text and getattr(block, "has_cross_attention", False):
            attn = dict(encoder_hidden_states=state["context"], encoder_attention_mask=state["context_bias"])
        if kind == "down":
            h, res = block(hidden_states=h, temb=emb, **attn)
            skips = skips + tuple(res)
        elif kind == "mid":
            h = block(h, emb, **attn)
        else:
            k = self.config.layers_per_block + 1
            skips, res = skips[:-k], skips[-k:]
            h = block(hidden_states=h, res_hidden_states_tuple=res, temb=emb, **attn)
        return {**state, "h": h, "skips": skips}

    def head(self, state: dict) -> torch.Tensor:
        inner = self.inner
        return inner.conv_out(inner.conv_act(inner.conv_norm_out(state["h"])))  # [B, C_out, H, W]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        state = self.stem(x_t, t, cond)
        branch = getattr(self, "control", None)  # a ControlNet (finetune/controlnet_unet.py), when one is added
        res = branch.residuals(self, x_t, t, cond, state) if branch is not None else None  # None: no control image
        n = self.config.levels
        for i in range(2 * n + 1):
            state = self.run_block(i, state)
            if res is not None and i == n - 1:  # diffusers' down_block_additional_residuals: every skip
                state = {**state, "skips": tuple(s + r for s, r in zip(state["skips"], res[0], strict=True))}
            elif res is not None and i == n:  # mid_block_additional_residual
                state = {**state, "h": state["h"] + res[1]}
        return self.head(state)

    # ------------------------------------------------------------------ export
    def save_diffusers(self, state: dict[str, torch.Tensor], out_dir: str | Path) -> str:
        """Write a diffusers folder (``config.json`` + safetensors) holding ``state`` (our keys,
        e.g. EMA weights); returns the diffusers class name to load it with."""
        import diffusers

        cls_name, kw = diffusers_kwargs(self.config)
        inner_sd = {k.removeprefix("inner."): v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("inner.")}
        if len(inner_sd) != len(state):
            raise ValueError("save_diffusers: every key of `state` must start with 'inner.'")
        with torch.device("meta"):
            model = getattr(diffusers, cls_name)(**kw)
        model.load_state_dict(inner_sd, strict=True, assign=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        return cls_name

    def load_diffusers(self, folder: str | Path) -> dict[str, torch.Tensor]:
        """Our state dict from a diffusers UNet folder (safetensors only) whose config matches this model;
        otherwise a ``ValueError`` naming the first mismatching config key."""
        from difftrain.models.diffusers_folder import check_diffusers_config, read_diffusers_folder

        cls_name, kw = diffusers_kwargs(self.config)
        found, dstate = read_diffusers_folder(folder)
        check_diffusers_config(folder, found, cls_name, kw)
        return self.state_from_diffusers(dstate)

    @staticmethod
    def state_from_diffusers(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state-dict keys for a diffusers UNet state dict (``init_from`` a diffusers folder)."""
        return {f"inner.{k}": v for k, v in diffusers_state.items()}
