"""LoRA as a model change (config key ``adapt``): a fresh adapter leaves every backbone's output unchanged (B = 0),
only the adapter trains, merging folds it into the plain architecture with the same output, several named
adapters compose, initial adapter weights are drawn from the run seed, and bad entries are one-line errors naming
``adapt[i].KEY`` (REFERENCES G's oracles)."""
from __future__ import annotations

import copy

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes
from difftrain.models import registry

FAMILIES = {
    "dit_class": ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10"],
    "dit_text": ["model.name=DiT-T/2", "model.cond=text", "encoders.text=minilm"],
    "dit_video": ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10", "model.frames=3",
                  "data.kind=video"],
    "unet": ["model.name=UNet-T", "model.cond=class", "model.num_classes=10"],
}


def trained_base(cfg):
    """(architecture config, the config's model with every weight perturbed): a trained model, whose
    zero-initialised heads (adaLN-Zero, the output layer) have moved too."""
    arch, acfg = registry.arch_config(cfg.model, 384 if cfg.model.cond == "text" else 0)
    base = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return acfg, base


def _model(family: str, adapt: str):
    cfg = load_config(None, [*FAMILIES[family], f"adapt={adapt}"])
    acfg, base = trained_base(cfg)
    side, c = acfg.image_size, acfg.in_channels
    x = torch.randn(2, *((cfg.model.frames,) if cfg.model.frames else ()), c, side, side)
    cond = ({"text_states": torch.randn(2, 5, 384), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
            if family == "dit_text" else {"class_labels": torch.tensor([1, 2])})
    return cfg, base, (x, torch.rand(2), cond)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fresh_lora_equals_base_and_merged_equals_unmerged(family):
    targets = {"dit_text": "[attn, cross_attn, mlp, modulation]", "unet": "[attn, modulation]"}.get(
        family, "[attn, mlp, modulation]")  # the class-conditional UNet-T has no feed-forward layers
    cfg, base, inputs = _model(family, f"[{{kind: lora, rank: 4, alpha: 8, targets: {targets}}}]")
    changes = changes_of(cfg)
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(changes[0].owns(n) for n in trainable)  # only the adapter trains
    assert all("lora_" in n for n in trainable)
    share = sum(p.numel() for n, p in model.named_parameters() if n in trainable) / sum(
        p.numel() for p in model.parameters())
    assert 0 < share < 0.2
    with torch.no_grad():
        assert torch.equal(model(*inputs), base(*inputs))  # B = 0: exactly the base model
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        trained = model(*inputs)
        assert not torch.allclose(trained, base(*inputs))
        merged = merge_changes(copy.deepcopy(model), changes)
        assert set(merged.state_dict()) == set(base.state_dict())  # the plain architecture again
        torch.testing.assert_close(merged(*inputs), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_restores_the_base_and_the_adapters(dora):
    """peft's in-place merge (the adapters kept) and unmerge: the same output merged, the base weights back after."""
    from difftrain.finetune.lora import set_merged

    cfg, base, inputs = _model("dit_text", f"[{{kind: lora, rank: 4, alpha: 8, targets: [attn, mlp], dora: {dora}}}]")
    model = apply_changes(copy.deepcopy(base), changes_of(cfg), seed=0).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        before = {n: p.clone() for n, p in model.named_parameters()}
        out = model(*inputs)
        set_merged(model, True)
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert moved and all("base_layer.weight" in n for n in moved)  # the adapters folded into the base weights
        torch.testing.assert_close(model(*inputs), out, rtol=0, atol=1e-5)
        set_merged(model, False)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(model(*inputs), out, rtol=0, atol=1e-5)


def test_adapter_weights_come_from_the_run_seed_and_the_scale_is_alpha_over_rank():
    cfg, base, inputs = _model("dit_class", "[{kind: lora, rank: 2, alpha: 4, targets: [attn]}]")
    a, b, c = (apply_changes(copy.deepcopy(base), changes_of(cfg), seed=s) for s in (0, 0, 1))
    key = "blocks.0.attn.qkv.lora_A.default.weight"
    pa, pb, pc = (dict(m.named_parameters())[key] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    layer = a.blocks[0].attn.qkv
    assert layer.scaling["default"] == 2.0
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(3, layer.in_features)
        want = layer.base_layer(x) + 2.0 * x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
        torch.testing.assert_close(layer(x), want)


def test_named_adapters_compose_each_training_only_its_own():
    cfg, base, inputs = _model("dit_class", "[{kind: lora, rank: 2, name: style}, {kind: lora, rank: 4, "
                                            "name: detail, targets: [mlp]}]")
    changes = changes_of(cfg)
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".detail." in n for n in trainable)  # the later adapter trains, the earlier is frozen
    assert any(".style." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        out = model(*inputs)
        torch.testing.assert_close(merge_changes(model, changes)(*inputs), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapt,words", [
    ("[{rank: 4}]", "config key 'adapt[0]' must be a mapping with a 'kind'"),
    ("[{kind: lorra}]", "config key 'adapt[0].kind' = 'lorra' is not one of: lora"),
    ("[{kind: lora, rnak: 4}]", "unknown config key 'adapt[0].rnak' for model change 'lora'"),
    ("[{kind: lora, rank: 0}]", "config key 'adapt[0].rank' must be"),
    ("[{kind: lora, dropout: 1.5}]", "config key 'adapt[0].dropout' must be"),
])
def test_bad_entries_name_the_key(adapt, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [f"adapt={adapt}"])


def test_a_target_that_matches_no_layer_names_the_key():
    cfg, base, _ = _model("dit_class", "[{kind: lora}, {kind: lora, name: b, targets: [cross_attn]}]")
    with pytest.raises(ConfigError, match=r"config key 'adapt\[1\].targets': 'cross_attn' matches no Linear layer"):
        apply_changes(copy.deepcopy(base), changes_of(cfg), seed=0)
    cfg, base, _ = _model("dit_class", "[{kind: lora, targets: ['blocks\\.0\\.attn\\.(qkv']}]")
    with pytest.raises(ConfigError, match="not a group .* or a valid regular expression"):
        apply_changes(copy.deepcopy(base), changes_of(cfg), seed=0)
