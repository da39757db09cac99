"""Export our DiT as a diffusers folder: ``DiTTransformer2DModel`` (class-conditional, adaLN-Zero) or
``PixArtTransformer2DModel`` (text-conditional, adaLN-single).

The folder is what diffusers itself writes: we build the diffusers model (on the meta device), load the mapped
state dict with ``strict=True`` and call its ``save_pretrained``. Options no diffusers class can express are refused
with an ``ExportError`` naming the option.

``load_dit_diffusers`` (``DiT.load_diffusers``) is the inverse, for ``init_from`` a diffusers folder.

Calling the exported model (continuous t in [0, 1], 1 = noise):
    DiT:    model(x, timestep=t * 1000, class_labels=labels).sample             (labels may be the null label)
    PixArt: model(x, encoder_hidden_states=text_states, timestep=t * 1000,
                  encoder_attention_mask=text_mask).sample                      (mask: 1 = real token)
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftrain.errors import DifftrainError

if TYPE_CHECKING:  # annotations only: DiT.save_diffusers / load_diffusers call this module
    from difftrain.models.dit import DiT, DiTConfig


class ExportError(DifftrainError, ValueError):
    """The model uses an option the target format cannot express; the message names it (one line from the CLI)."""


def diffusers_target(cfg: DiTConfig) -> tuple[str, dict]:
    """The diffusers class name and its constructor kwargs for ``cfg``, or ``ExportError`` naming the option."""
    D = cfg.hidden_size
    if cfg.num_classes > 0 and cfg.text_dim > 0:
        raise ExportError(f"cannot export class and text conditioning at once (num_classes={cfg.num_classes}, "
                          f"text_dim={cfg.text_dim}): no diffusers DiT class takes both")
    if cfg.num_classes == 0 and cfg.text_dim == 0:
        raise ExportError("cannot export an unconditional DiT (num_classes=0, text_dim=0): DiTTransformer2DModel "
                          "needs class labels and PixArtTransformer2DModel needs text")
    if cfg.num_classes > 0 and cfg.mod_type != "zero":
        raise ExportError(f"cannot export modulation={cfg.modulation!r} (adaLN-single) without text: "
                          "DiTTransformer2DModel is adaLN-Zero only")
    if cfg.text_dim > 0 and cfg.mod_type != "single":
        raise ExportError(f"cannot export modulation={cfg.modulation!r} (adaLN-Zero) with text_dim={cfg.text_dim}: "
                          "PixArtTransformer2DModel is adaLN-single only")
    if int(D * cfg.mlp_ratio) != 4 * D:
        raise ExportError(f"cannot export mlp_ratio={cfg.mlp_ratio}: diffusers DiT/PixArt blocks have a 4x MLP")
    common = dict(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=D // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        num_layers=cfg.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=cfg.image_size,
        patch_size=cfg.patch_size,
        activation_fn="gelu-approximate",
        upcast_attention=False,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    if cfg.mod_type == "zero":
        if cfg.pos_interp_scale != 1.0:
            raise ExportError(f"cannot export pos_interp_scale={cfg.pos_interp_scale} as DiTTransformer2DModel: "
                              "it has no interpolation_scale (only 1.0)")
        return "DiTTransformer2DModel", dict(common, num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero")
    interp = cfg.pos_interp_scale
    return "PixArtTransformer2DModel", dict(
        common,
        num_embeds_ada_norm=1000,  # unused by adaLN-single, but diffusers requires it to be set
        norm_type="ada_norm_single",
        cross_attention_dim=D,  # captions are projected to the hidden size first
        caption_channels=cfg.text_dim,
        interpolation_scale=int(interp) if float(interp).is_integer() else interp,
        use_additional_conditions=False,  # no resolution / aspect-ratio embedders
        attention_type="default",
    )


# ---------------------------------------------------------------------------------------- key mapping
# One table drives both directions: each row is (diffusers keys, our key). Several diffusers keys in one row are the
# row blocks of our fused tensor, in order (q, k, v); several rows with the same our key are copies diffusers keeps.
Row = tuple[tuple[str, ...], str]


def _linear(rows: list[Row], dst: str, src: str) -> None:
    rows += [((f"{dst}.weight",), f"{src}.weight"), ((f"{dst}.bias",), f"{src}.bias")]


def _split(rows: list[Row], dsts: list[str], src: str) -> None:
    """Fused projection (rows stacked in the order of ``dsts``) <-> one diffusers linear per part."""
    rows += [(tuple(f"{d}.weight" for d in dsts), f"{src}.weight"), (tuple(f"{d}.bias" for d in dsts), f"{src}.bias")]


def _block_common(rows: list[Row], d: str, s: str) -> None:
    _split(rows, [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"], f"{s}.attn.qkv")
    _linear(rows, f"{d}.attn1.to_out.0", f"{s}.attn.proj")
    _linear(rows, f"{d}.ff.net.0.proj", f"{s}.mlp.fc1")
    _linear(rows, f"{d}.ff.net.2", f"{s}.mlp.fc2")


def key_map(cfg: DiTConfig) -> list[Row]:
    """Rows (diffusers keys, our key) for ``diffusers_target(cfg)``."""
    name, _ = diffusers_target(cfg)
    rows: list[Row] = []
    _linear(rows, "pos_embed.proj", "patch_embed")
    if name == "DiTTransformer2DModel":
        for i in range(cfg.depth):
            d, s = f"transformer_blocks.{i}", f"blocks.{i}"
            # diffusers keeps a copy of the t + label embedder in every block's norm1.emb
            _linear(rows, f"{d}.norm1.emb.timestep_embedder.linear_1", "t_embed.mlp.0")
            _linear(rows, f"{d}.norm1.emb.timestep_embedder.linear_2", "t_embed.mlp.2")
            rows.append(((f"{d}.norm1.emb.class_embedder.embedding_table.weight",), "y_embed.weight"))
            _linear(rows, f"{d}.norm1.linear", f"{s}.adaLN.1")
            _block_common(rows, d, s)
        _linear(rows, "proj_out_1", "final_layer.adaLN.1")
        _linear(rows, "proj_out_2", "final_layer.linear")
    else:
        _linear(rows, "adaln_single.emb.timestep_embedder.linear_1", "t_embed.mlp.0")
        _linear(rows, "adaln_single.emb.timestep_embedder.linear_2", "t_embed.mlp.2")
        _linear(rows, "adaln_single.linear", "t_block.1")
        _linear(rows, "caption_projection.linear_1", "text_embed.0")
        _linear(rows, "caption_projection.linear_2", "text_embed.2")
        for i in range(cfg.depth):
            d, s = f"transformer_blocks.{i}", f"blocks.{i}"
            rows.append(((f"{d}.scale_shift_table",), f"{s}.scale_shift_table"))
            _block_common(rows, d, s)
            _linear(rows, f"{d}.attn2.to_q", f"{s}.cross_attn.q")
            _split(rows, [f"{d}.attn2.to_k", f"{d}.attn2.to_v"], f"{s}.cross_attn.kv")
            _linear(rows, f"{d}.attn2.to_out.0", f"{s}.cross_attn.proj")
        rows.append((("scale_shift_table",), "final_layer.scale_shift_table"))
        _linear(rows, "proj_out", "final_layer.linear")
    return rows


def convert_state_dict(cfg: DiTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the diffusers one for ``diffusers_target(cfg)`` (tensors are views; clone before saving)."""
    out: dict[str, torch.Tensor] = {}
    for dsts, src in key_map(cfg):
        out.update(zip(dsts, state[src].chunk(len(dsts))))
    return out


def state_from_diffusers(cfg: DiTConfig, dstate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``convert_state_dict``: a diffusers state dict -> ours. Fused tensors are concatenated back;
    the copies diffusers keeps (the t/label embedder in every block) must agree and become one tensor."""
    rows = key_map(cfg)
    needed = {k for dsts, _ in rows for k in dsts}
    missing, unexpected = sorted(needed - dstate.keys()), sorted(dstate.keys() - needed)
    if missing or unexpected:
        raise ValueError(f"diffusers state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out: dict[str, torch.Tensor] = {}
    first: dict[str, str] = {}  # our key -> the diffusers key it was first read from
    for dsts, src in rows:
        t = dstate[dsts[0]] if len(dsts) == 1 else torch.cat([dstate[k] for k in dsts])
        if src not in out:
            out[src], first[src] = t, dsts[0]
        elif not torch.equal(out[src], t):
            raise ValueError(f"diffusers keys '{first[src]}' and '{dsts[0]}' are copies of our '{src}' but differ")
    return out


def export_dit_diffusers(model: DiT, state: dict[str, torch.Tensor], out_dir: str | Path) -> str:
    """Write ``state`` (e.g. EMA weights, keys of ``model.state_dict()``) as a diffusers folder; returns the class name."""
    import diffusers

    cfg = model.config
    if cfg.guidance_embed:  # refused here only: loading a diffusers folder into such a model is init_from's affair
        raise ExportError("cannot export guidance_embed=True: no diffusers DiT / PixArt class takes the guidance "
                          "scale as an input")
    name, kwargs = diffusers_target(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    mapped = {k: v.detach().to("cpu").clone().contiguous() for k, v in convert_state_dict(cfg, state).items()}
    with torch.device("meta"):
        target = getattr(diffusers, name)(**kwargs)
    target.load_state_dict(mapped, strict=True, assign=True)
    target.save_pretrained(str(out_dir), safe_serialization=True)
    return name


def load_dit_diffusers(model: DiT, folder: str | Path) -> dict[str, torch.Tensor]:
    """Our state dict (keys of ``model.state_dict()``) from a diffusers DiT / PixArt folder (safetensors only) whose
    config matches ``model``; otherwise a ``ValueError`` naming the first mismatching config key."""
    from difftrain.models.diffusers_folder import check_diffusers_config, read_diffusers_folder

    cfg = model.config
    name, kwargs = diffusers_target(cfg)
    found, dstate = read_diffusers_folder(folder)
    if name == "PixArtTransformer2DModel" and found.get("use_additional_conditions") is None:
        found = dict(found, use_additional_conditions=found.get("sample_size", 128) == 128)  # as diffusers resolves it
    # folders written before diffusers 0.28 name the generic class; diffusers itself remaps it by norm_type
    check_diffusers_config(folder, found, name, kwargs, aliases=("Transformer2DModel",))
    return state_from_diffusers(cfg, dstate)
