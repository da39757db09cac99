"""DiffFit as a model change (config key ``adapt``, ``finetune/difffit.py``): a fresh DiffFit (γ = 1) is exactly the
base model on every DiT form, only biases, adaLN tables, the class embedding and γ train, merging folds γ into the
branches' output projections with the same output and the plain state-dict keys, it composes with LoRA in either
order, its trainable share of DiT-XL/2 is the paper's order (Xie et al. 2023: 0.12%), and bad entries are one-line
errors naming ``adapt[i].KEY``."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes
from difftrain.models import registry
from tests.unit.test_lora import _model

# form -> (scales, γ per scaled block): a factorized video block's temporal attention has its own γ in "attn"
FORMS = {"dit_class": ("[attn, mlp]", 2), "dit_text": ("[attn, cross_attn, mlp]", 3), "dit_video": ("[attn, mlp]", 2),
         "dit_video_factorized": ("[attn, mlp]", 3)}


def _perturb(model, gen_seed: int = 1) -> None:
    """Random γ and biases: a trained DiffFit."""
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", sorted(FORMS))
def test_fresh_difffit_equals_base_and_merged_equals_unmerged(family):
    scales, per_block = FORMS[family]
    if family == "dit_video_factorized":
        cfg, base, inputs = _video_factorized()
    else:
        cfg, base, inputs = _model(family, f"[{{kind: difffit, scales: {scales}}}]")
    change = changes_of(cfg)[0]
    model = apply_changes(copy.deepcopy(base), [change], seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gammas = {n for n in trainable if n.endswith(".difffit_gamma")}
    depth = len(base.blocks)
    assert {n.split(".")[1] for n in gammas} == {str(b) for b in range((depth + 1) // 2)}  # the first half
    assert len(gammas) == (depth + 1) // 2 * per_block
    assert trainable == {n for n, _ in model.named_parameters() if change.owns(n)}  # owns = what trains
    assert all(n.endswith((".bias", ".difffit_gamma", "scale_shift_table")) or n == "y_embed.weight"
               for n in trainable)
    assert not any(n.endswith(".weight") and "y_embed" not in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(*inputs), base(*inputs))  # γ = 1: exactly the base model
        _perturb(model)
        trained = model(*inputs)
        assert not torch.allclose(trained, base(*inputs))
        merged = merge_changes(copy.deepcopy(model), [change])
        assert set(merged.state_dict()) == set(base.state_dict())  # the plain architecture again
        assert type(merged.blocks[0].attn) is type(base.blocks[0].attn)
        torch.testing.assert_close(merged(*inputs), trained, rtol=1e-5, atol=5e-6)  # fp32 re-association


def _video_factorized():
    cfg = load_config(None, ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10", "model.frames=3",
                             "data.kind=video", "model.attention=factorized", "adapt=[{kind: difffit}]"])
    arch, acfg = registry.arch_config(cfg.model, 0)
    base = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    with torch.no_grad():  # trained: the zero-initialised projections move too
        g = torch.Generator().manual_seed(0)
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, acfg.in_channels, acfg.image_size, acfg.image_size)
    assert base.blocks[0].temporal_attn is not None
    return cfg, base, (x, torch.rand(2), {"class_labels": torch.tensor([1, 2])})


def test_gradients_reach_only_the_trained_parameters():
    cfg, base, inputs = _model("dit_class", "[{kind: difffit, blocks: [0, 3], class_embed: false}]")
    model = apply_changes(copy.deepcopy(base), changes_of(cfg), seed=0)
    model(*inputs).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in with_grad if "gamma" in n} == {"0", "3"}
    assert "y_embed.weight" not in with_grad and "blocks.1.attn.qkv.bias" in with_grad


@pytest.mark.parametrize("order", ["difffit_then_lora", "lora_then_difffit"])
def test_composes_with_lora_in_either_order(order):
    """The later change trains, the earlier is frozen; γ scales the whole branch (a LoRA delta inside it too), so
    merging (in reverse order) gives the same output either way."""
    lora, difffit = "{kind: lora, rank: 2, targets: [attn, mlp]}", "{kind: difffit}"
    entries = [difffit, lora] if order == "difffit_then_lora" else [lora, difffit]
    cfg, base, inputs = _model("dit_class", f"[{', '.join(entries)}]")
    changes = changes_of(cfg)
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    later = changes[1]
    assert trainable and all(later.owns(n) for n in trainable)
    if order == "difffit_then_lora":
        assert all(".lora_" in n for n in trainable)
    else:
        assert not any(".lora_" in n for n in trainable)
        assert "blocks.0.attn.proj.base_layer.bias" in trainable  # the base's bias under the LoRA layer
    with torch.no_grad():
        assert torch.equal(model(*inputs), base(*inputs))
        g = torch.Generator().manual_seed(2)
        for n, p in model.named_parameters():  # both changes trained: γ, biases and lora_B away from their init
            if n.endswith((".difffit_gamma", ".bias")) or "lora_B" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        trained = model(*inputs)
        merged = merge_changes(copy.deepcopy(model), changes)
        assert set(merged.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(merged(*inputs), trained, rtol=1e-5, atol=5e-6)


def test_trainable_share_is_the_papers_order_of_magnitude():
    """Xie et al. 2023 (Table 1): DiffFit trains 0.12% of DiT-XL/2 on a 101-class set (Food-101). Counted on meta."""
    shares = {}
    for name in ("DiT-S/2", "DiT-XL/2"):
        cfg = load_config(None, [f"model.name={name}", "model.cond=class", "model.num_classes=101",
                                 "model.image_size=32", "model.in_channels=4", "adapt=[{kind: difffit}]"])
        arch, acfg = registry.arch_config(cfg.model, 0)
        model = apply_changes(registry.build(arch, acfg), changes_of(cfg), seed=0)
        total = sum(p.numel() for p in model.parameters())
        shares[name] = sum(p.numel() for p in model.parameters() if p.requires_grad) / total
        print(f"DiffFit trainable share of {name} (101 classes): {100 * shares[name]:.3f}% of {total / 1e6:.1f}M")
    assert 0.0005 < shares["DiT-XL/2"] < 0.003  # 0.05%..0.3%: the paper's 0.12% order
    assert shares["DiT-XL/2"] < shares["DiT-S/2"] < 0.01  # biases grow with D, weights with D^2


@pytest.mark.parametrize("adapt,words", [
    ("[{kind: difffit, scales: [attn, ffn]}]", "'adapt[0].scales': 'ffn' is not one of: attn, cross_attn, mlp"),
    ("[{kind: difffit, blocks: [0, 4]}]", "config key 'adapt[0].blocks': 4 is not a block index of the model (0..3)"),
    ("[{kind: difffit, scales: [cross_attn]}]", "config key 'adapt[0].scales': 'cross_attn' needs a text-conditional"),
    ("[{kind: difffit}, {kind: difffit}]", "config key 'adapt[1]': the model already has DiffFit scale factors"),
    ("[{kind: lora, dora: true}, {kind: difffit}]", "config key 'adapt[1]': DiffFit after a DoRA adapter"),
])
def test_bad_entries_name_the_key(adapt, words):
    cfg, base, _ = _model("dit_class", adapt)
    with pytest.raises(ConfigError, match=re.escape(words)):
        apply_changes(copy.deepcopy(base), changes_of(cfg), seed=0)


def test_unknown_keys_and_the_unet_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"unknown config key 'adapt\[0\]\.block' for model change 'difffit'"):
        load_config(None, ["adapt=[{kind: difffit, block: [1]}]"])
    cfg, base, _ = _model("unet", "[{kind: difffit}]")
    with pytest.raises(ConfigError, match=r"config key 'adapt\[0\]\.kind' = 'difffit' applies to a DiT .* not to UNet"):
        apply_changes(copy.deepcopy(base), changes_of(cfg), seed=0)
