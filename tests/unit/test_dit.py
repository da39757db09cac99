"""Our DiT on tiny configs: shapes, conditioning, meta build + init, gradients, trunk cut, save/load."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from difftrain.config import ConfigError, ModelConfig
from difftrain.models import registry
from difftrain.models.dit import DiT, DiTConfig

NUM_CLASSES, TEXT_DIM, L = 5, 12, 6

KINDS = {  # name: (num_classes, text_dim, modulation)
    "class": (NUM_CLASSES, 0, "auto"),
    "text": (0, TEXT_DIM, "auto"),
    "both": (NUM_CLASSES, TEXT_DIM, "auto"),
    "uncond": (0, 0, "auto"),
    "class_single": (NUM_CLASSES, 0, "single"),
    "text_zero": (0, TEXT_DIM, "zero"),
}


def tiny(kind: str, **kw) -> DiTConfig:
    nc, td, mod = KINDS[kind]
    args = dict(image_size=8, in_channels=3, num_classes=nc, text_dim=td, patch_size=2, hidden_size=32, depth=2,
                num_heads=2, modulation=mod)
    return DiTConfig(**dict(args, **kw))


def make_cond(cfg: DiTConfig, B: int, gen: torch.Generator | None = None) -> dict:
    cond = {}
    if cfg.num_classes:
        cond["class_labels"] = torch.randint(0, cfg.num_classes + 1, (B,), generator=gen)  # incl. the null label
    if cfg.text_dim:
        cond["text_states"] = torch.randn(B, L, cfg.text_dim, generator=gen)
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, L // 2:] = False
        cond["text_mask"] = mask
    return cond


def materialized(cfg: DiTConfig, seed: int = 0) -> DiT:
    return registry.materialize(registry.build("dit", cfg), "cpu", seed=seed)


def perturb(model: DiT, std: float = 0.1, seed: int = 0) -> DiT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_backward_shapes(kind):
    cfg = tiny(kind)
    model = perturb(materialized(cfg))
    for H, W in [(8, 8), (16, 24)]:  # native and a non-square bucket
        x = torch.randn(2, 3, H, W)
        t = torch.rand(2)
        out = model(x, t, make_cond(cfg, 2))
        assert out.shape == (2, 3, H, W)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_out_channels_and_modulation_resolution():
    cfg = tiny("class", out_channels=6)
    assert (cfg.mod_type, cfg.out_ch, cfg.t_freq_shift) == ("zero", 6, 1)
    assert (tiny("text").mod_type, tiny("text").t_freq_shift) == ("single", 0)
    model = perturb(materialized(cfg))
    assert model(torch.randn(1, 3, 8, 8), torch.rand(1), make_cond(cfg, 1)).shape == (1, 6, 8, 8)


@pytest.mark.parametrize("kind", ["class", "text", "both", "uncond"])
def test_meta_build_materialize_zero_output(kind):
    cfg = tiny(kind)
    model = registry.build("dit", cfg)
    assert all(p.is_meta for p in model.parameters())
    registry.materialize(model, "cpu", seed=3)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = model(torch.randn(2, 3, 8, 12), torch.rand(2), make_cond(cfg, 2))
    assert torch.equal(out, torch.zeros_like(out))  # output projection is zero-initialised
    assert not list(model.buffers())  # position embeddings are computed, never stored
    again = registry.materialize(registry.build("dit", cfg), "cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_init_weights_zero_init_parts():
    m = materialized(tiny("class"))
    assert m.final_layer.linear.weight.abs().sum() == 0 and m.final_layer.adaLN[1].weight.abs().sum() == 0
    assert all(b.adaLN[1].weight.abs().sum() == 0 for b in m.blocks)
    m = materialized(tiny("text"))
    assert all(b.cross_attn.proj.weight.abs().sum() == 0 for b in m.blocks)
    assert m.blocks[0].scale_shift_table.std() > 0.05  # PixArt-α tables ~ N(0, 1/D)


@pytest.mark.parametrize("kind", ["class", "text", "both", "uncond"])
def test_gradients_reach_all_params_after_a_few_steps(kind):
    cfg = tiny(kind)
    torch.manual_seed(0)
    model = materialized(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, cond = torch.randn(4, 3, 8, 8), torch.rand(4), make_cond(cfg, 4)
    if cfg.num_classes:
        cond["class_labels"] = torch.arange(4) % (NUM_CLASSES + 1)
    target = torch.randn(4, 3, 8, 8)
    for _ in range(4):  # zero-init unblocks layer by layer: proj, then adaLN, then the rest
        opt.zero_grad()
        loss = (model(x, t, cond) - target).square().mean()
        loss.backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_trunk_cut_equals_forward():
    cfg = tiny("both")
    model = perturb(materialized(cfg)).eval()
    x, t, cond = torch.randn(2, 3, 8, 12), torch.rand(2), make_cond(cfg, 2)
    h, c, mod, text, mask = model.embed(x, t, cond)
    for block in model.blocks:
        h = block(h, mod, text, mask)
    assert torch.equal(model.final(h, c, x.shape[-2:]), model(x, t, cond))
    assert [n for n, _ in model.named_children()].count("blocks") == 1 and len(model.blocks) == cfg.depth


def test_conditioning_is_used():
    cfg = tiny("both")
    model = perturb(materialized(cfg)).eval()
    x, t, cond = torch.randn(2, 3, 8, 8), torch.rand(2), make_cond(cfg, 2)
    base = model(x, t, cond)
    labels = (cond["class_labels"] + 1) % (NUM_CLASSES + 1)
    assert not torch.allclose(model(x, t, dict(cond, class_labels=labels)), base)
    assert not torch.allclose(model(x, t * 0.5, cond), base)
    # padded text tokens (mask False) do not matter; real ones do
    states = cond["text_states"].clone()
    states[:, L // 2:] = torch.randn_like(states[:, L // 2:])
    assert torch.allclose(model(x, t, dict(cond, text_states=states)), base, atol=1e-6)
    states[:, 0] += 1.0
    assert not torch.allclose(model(x, t, dict(cond, text_states=states)), base)
    # a caption with no real token gives finite output
    empty = dict(cond, text_mask=torch.zeros(2, L, dtype=torch.bool))
    assert torch.isfinite(model(x, t, empty)).all()


@pytest.mark.parametrize("kind,key", [("class", "class_labels"), ("text", "text_states"), ("text", "text_mask")])
def test_missing_condition_is_a_clear_error(kind, key):
    cfg = tiny(kind)
    model = materialized(cfg)
    cond = make_cond(cfg, 1)
    del cond[key]
    with pytest.raises(ValueError, match=key):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), cond)


def test_bad_input_and_config_errors():
    model = materialized(tiny("uncond"))
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 8, 7), torch.rand(1), {})
    with pytest.raises(ConfigError, match="hidden_size"):
        tiny("class", hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="modulation"):
        tiny("class", modulation="film")
    with pytest.raises(ConfigError, match="image_size"):
        tiny("class", image_size=9)


def test_config_json_and_registry_round_trip(tmp_path):
    cfg = tiny("both", out_channels=6)
    assert DiTConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    model = perturb(materialized(cfg)).eval()
    registry.save_pretrained(model, model.state_dict(), tmp_path)
    loaded = registry.load_pretrained(tmp_path).eval()
    x, t, cond = torch.randn(2, 3, 8, 8), torch.rand(2), make_cond(cfg, 2)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_registry_sizes_build_on_meta():
    arch, cfg = registry.arch_config(ModelConfig(name="DiT-XL/2", image_size=32, in_channels=4, cond="class",
                                                 num_classes=1000))
    model = registry.build(arch, cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 670e6 < n < 680e6  # DiT-XL/2: 675M parameters (Peebles & Xie 2023, Table 4)
    arch, cfg = registry.arch_config(ModelConfig(name="DiT-T/2", image_size=8, in_channels=4, cond="text"),
                                     text_dim=TEXT_DIM)
    assert cfg.mod_type == "single" and cfg.num_classes == 0
    with pytest.raises(ConfigError, match="model.args.nope"):
        registry.arch_config(ModelConfig(name="DiT-T/2", cond="none", args={"nope": 1}))
