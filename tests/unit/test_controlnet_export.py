"""A DiT ControlNet's export (finetune/controlnet_export.py): the base as a stock ``PixArtTransformer2DModel`` folder,
the branch in the layout of diffusers' PixArt ControlNet research project, every block loading into diffusers' own
``BasicTransformerBlock`` with no missing or unexpected key, and that project's wiring (PixArt-δ) over the stock
transformer giving our output; our own branch file reads back to the same model."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from difftrain.finetune.controlnet import ControlNet, ControlNetArgs
from difftrain.finetune.controlnet_export import RESEARCH_CLASS, load_controlnet
from difftrain.finetune.served import save_served
from tests.unit.test_dit_export import random_model, tiny

diffusers = pytest.importorskip("diffusers")


def _controlnet_model(cfg, layers: int):
    model = copy.deepcopy(random_model(cfg, seed=1))
    ControlNet(ControlNetArgs(layers=layers)).apply(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained branch: the zero projections moved
        for p in model.control.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _export(model, out) -> tuple[str, str]:
    return save_served(model, model.state_dict(), out)  # difftrain export's path


def _research_forward(ref, blocks, x, t, states, control):
    """The research project's ``PixArtControlNetTransformerModel.forward`` (PixArt-δ), over stock diffusers modules."""
    from diffusers.models.attention import BasicTransformerBlock  # noqa: F401  (the blocks' class)

    B, _, H, W = x.shape
    p = ref.config.patch_size
    hidden = ref.pos_embed(x)
    timestep, embedded = ref.adaln_single(t * 1000, None, batch_size=B, hidden_dtype=hidden.dtype)
    enc = ref.caption_projection(states).view(B, -1, hidden.shape[-1])
    c = ref.pos_embed(control)
    for i, block in enumerate(ref.transformer_blocks):
        if 0 < i <= len(blocks):
            j = i - 1
            if j == 0:
                c = hidden + blocks[0]["before_proj"](c)
            c = blocks[j]["transformer_block"](hidden_states=c, encoder_hidden_states=enc, timestep=timestep)
            hidden = hidden + blocks[j]["after_proj"](c)
        hidden = block(hidden, encoder_hidden_states=enc, timestep=timestep)
    shift, scale = (ref.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    hidden = ref.proj_out(ref.norm_out(hidden) * (1 + scale) + shift)
    C = ref.out_channels
    hidden = hidden.reshape(B, H // p, W // p, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(B, C, H, W)


def test_research_layout_with_diffusers_blocks_reproduces_our_output(tmp_path):
    from diffusers.models.attention import BasicTransformerBlock

    cfg = tiny(text_dim=12, hidden_size=64, num_heads=4, depth=4)
    model = _controlnet_model(cfg, layers=2)
    name, line = _export(model, tmp_path)
    assert name == "PixArtTransformer2DModel" and RESEARCH_CLASS in line
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path).eval()
    folder = tmp_path / "controlnet"
    assert json.loads((folder / "config.json").read_text()) == {"_class_name": RESEARCH_CLASS, "num_layers": 2}
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    D, heads = cfg.hidden_size, cfg.num_heads
    blocks, used = [], set()
    for j in range(2):
        tb = BasicTransformerBlock(D, heads, D // heads, dropout=0.0, cross_attention_dim=D,
                                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True,
                                   upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                   norm_eps=1e-6, attention_type="default")
        parts = {"transformer_block": tb, "after_proj": torch.nn.Linear(D, D)}
        if j == 0:
            parts["before_proj"] = torch.nn.Linear(D, D)
        for part, module in parts.items():
            prefix = f"controlnet_blocks.{j}.{part}."
            sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)  # no missing, no unexpected key
            used |= {prefix + k for k in sub}
        blocks.append({k: m.eval() for k, m in parts.items()})
    assert used == set(state)  # every exported tensor is a block's
    g = torch.Generator().manual_seed(0)
    x, control = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, states = torch.rand(2, generator=g), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        ours = model(x, t, {"text_states": states, "text_mask": torch.ones(2, 5, dtype=torch.bool),
                            "control": control})
        theirs = _research_forward(ref, blocks, x, t, states, control)
        base = ref(x, encoder_hidden_states=states, timestep=t * 1000).sample
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-2  # the branch acts


@pytest.mark.parametrize("kw", [dict(text_dim=12, hidden_size=64, num_heads=4), dict(num_classes=5)])
def test_our_branch_file_reads_back(tmp_path, kw):
    cfg = tiny(depth=3, **kw)
    model = _controlnet_model(cfg, layers=2)
    name, line = _export(model, tmp_path)
    assert (tmp_path / "controlnet" / "config.json").is_file() == (name == "PixArtTransformer2DModel")
    assert name == "PixArtTransformer2DModel" or "pairs with PixArt's adaLN-single blocks" in line
    fresh = random_model(cfg, seed=5)
    fresh.load_state_dict(fresh.load_diffusers(tmp_path))
    assert load_controlnet(fresh, tmp_path, "cpu")
    g = torch.Generator().manual_seed(0)
    cond = ({"text_states": torch.randn(2, 5, 12, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
            if cfg.text_dim else {"class_labels": torch.tensor([1, 2])})
    cond["control"] = torch.randn(2, 4, 8, 8, generator=g)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, cond), model(x, t, cond))
