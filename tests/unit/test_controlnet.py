"""ControlNet as a model change (config ``adapt: [{kind: controlnet}]``, finetune/controlnet.py): a fresh branch, a
scale of 0 and a missing control image all give the base model exactly; a trained branch changes the output only
where there is a control image; only the branch trains; the branch follows PixArt-δ's wiring (copy j feeds base block
j + 1); it composes with LoRA; bad entries are one-line errors (REFERENCES G's oracles)."""
from __future__ import annotations

import copy

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes
from difftrain.finetune.controlnet import ControlNet, ControlNetArgs
from difftrain.finetune.lora import LoRA, LoRAArgs
from tests.unit.test_lora import _model


def _controlnet(family: str = "dit_text", layers: int = 1, before: tuple = ()):
    _, base, (x, t, cond) = _model(family, "[]")
    changes = [*before, ControlNet(ControlNetArgs(layers=layers), len(before))]
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    control = torch.randn_like(x)
    return changes, base, model, (x, t, cond), control


def perturb(module, seed: int = 1) -> None:
    """Every parameter of ``module`` moved off its init (what training does; zero projections included)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _train(model) -> None:
    perturb(model.control)


@pytest.mark.parametrize("family", ["dit_text", "dit_class"])
def test_fresh_branch_scale_zero_and_no_control_are_the_base(family):
    changes, base, model, (x, t, cond), control = _controlnet(family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("control.") and changes[0].owns(n) for n in trainable)
    with torch.no_grad():
        ref = base(x, t, cond)
        assert torch.equal(model(x, t, {**cond, "control": control}), ref)  # zero projections
        _train(model)
        assert torch.equal(model(x, t, cond), ref)  # no control image: the base
        assert torch.equal(model(x, t, {**cond, "control": control, "control_scale": 0.0}), ref)
        out = model(x, t, {**cond, "control": control})
        assert not torch.allclose(out, ref)
        assert not torch.allclose(out, model(x, t, {**cond, "control": torch.randn_like(x)}))  # it reads the image


def test_branch_follows_the_pixart_delta_wiring():
    """An independent evaluation of the equations in the module docstring with the model's own blocks."""
    changes, base, model, (x, t, cond), control = _controlnet("dit_text", layers=2)
    _train(model)
    with torch.no_grad():
        full = {**cond, "control": control, "control_scale": 0.7}
        tokens, c, mod, text, mask = model.embed(x, t, full)
        h = model.tokens(control)
        xs = model.blocks[0](tokens, mod, text, mask)
        for j in range(2):
            if j == 0:
                h = xs + model.control.before_proj(h)
            h = model.control.blocks[j](h, mod, text, mask)
            xs = model.blocks[j + 1](xs + 0.7 * model.control.after_proj[j](h), mod, text, mask)
        for block in model.blocks[3:]:
            xs = block(xs, mod, text, mask)
        torch.testing.assert_close(model(x, t, full), model.final(xs, c, x.shape[-2:]), rtol=0, atol=1e-6)
    # the copies start as the base's first blocks, and the base is untouched
    fresh = apply_changes(copy.deepcopy(base), changes, seed=0)
    for j in range(2):
        for (n, a), (_, b) in zip(fresh.control.blocks[j].state_dict().items(), base.blocks[j].state_dict().items()):
            assert torch.equal(a, b), n
    assert all(torch.equal(a, b) for a, b in zip(model.blocks.parameters(), base.blocks.parameters()))


def test_merge_keeps_the_branch_and_lora_composes():
    changes, base, model, (x, t, cond), control = _controlnet(
        "dit_text", before=(LoRA(LoRAArgs(rank=4, targets=["attn"]), 0),))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("control.") for n in trainable)  # the later change trains
    _train(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        full = {**cond, "control": control}
        before = model(x, t, full)
        merge_changes(model, changes)
        assert hasattr(model, "control") and not any("lora_" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(x, t, full), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,layers,message", [
    ("unet", 0, "ControlNetModel pairs with the text UNet (UNet2DConditionModel)"),  # the class-conditional UNet-T
    ("dit_video", 0, "built for the image DiT and the text UNet, not VideoDiT"),
    ("dit_class", 9, "'adapt[0].layers' = 9"),
])
def test_bad_entries_are_one_line_errors(family, layers, message):
    _, base, _ = _model(family, "[]")
    with pytest.raises(ConfigError, match="^config key 'adapt\\[0\\]") as e:
        apply_changes(base, [ControlNet(ControlNetArgs(layers=layers), 0)], seed=0)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="adapt\\[0\\].layers"):
        changes_of(type("Cfg", (), {"adapt": [{"kind": "controlnet", "layers": -1}]})())


CN = 'adapt=[{"kind":"controlnet"}]'


@pytest.mark.parametrize("overrides,message", [
    ([CN], "'adapt[0].kind' = controlnet needs control images: set data.control"),
    (["data.control=edges"], "'data.control' = 'edges': no model change reads control images"),
    ([CN, "data.control=edges", "stage=reflow"], "controlnet trains with stage pretrain"),
    ([CN, "data.control=edges", "parallel.pp=2"], "'parallel.pp' = 2: a controlnet (adapt[0])"),
])
def test_config_refusals_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
