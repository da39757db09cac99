"""T2I-Adapter as a model change (config ``adapt: [{kind: t2i_adapter}]``, finetune/t2i_adapter.py): a fresh adapter,
a scale of 0 and a missing control image all give the base model exactly; one optimizer step moves only the adapter
and makes the output read the control image; the features follow the module docstring's equations; the adapter is a
small share of the model; it composes with a ControlNet and its export reads back; bad entries are one-line errors
(REFERENCES G's oracles)."""
from __future__ import annotations

import copy

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of
from difftrain.finetune.controlnet import ControlNet, ControlNetArgs
from difftrain.finetune.served import load_served, save_served
from difftrain.finetune.t2i_adapter import T2IAdapter, T2IAdapterArgs
from difftrain.models import registry
from tests.unit.test_controlnet import perturb
from tests.unit.test_dit_export import random_model, tiny
from tests.unit.test_lora import _model


def _adapted(family: str = "dit_text", **kw):
    _, base, (x, t, cond) = _model(family, "[]")
    changes = [T2IAdapter(T2IAdapterArgs(**kw), 0)]
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    return changes, base, model, (x, t, cond), torch.randn_like(x)


_train = perturb


@pytest.mark.parametrize("family", ["dit_text", "dit_class"])
def test_fresh_adapter_scale_zero_and_no_control_are_the_base(family):
    changes, base, model, (x, t, cond), control = _adapted(family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.") and changes[0].owns(n) for n in trainable)
    assert model.adapter.receivers == list(range(len(model.blocks) // 2))  # default: the first half
    with torch.no_grad():
        ref = base(x, t, cond)
        assert torch.equal(model(x, t, {**cond, "control": control}), ref)  # zero output projections
        _train(model.adapter)
        assert torch.equal(model(x, t, cond), ref)  # no control image: the base
        assert torch.equal(model(x, t, {**cond, "control": control, "control_scale": 0.0}), ref)
        out = model(x, t, {**cond, "control": control})
        assert not torch.allclose(out, ref)
        assert not torch.allclose(out, model(x, t, {**cond, "control": torch.randn_like(x)}))  # it reads the image


def test_one_optimizer_step_moves_only_the_adapter_and_reads_the_control_image():
    changes, base, model, (x, t, cond), control = _adapted("dit_class")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    full = {**cond, "control": control}
    torch.nn.functional.mse_loss(model(x, t, full), torch.randn_like(x)).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adapter."))
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("adapter.") for n in moved)
    assert {f"adapter.out.{j}.weight" for j in range(len(model.adapter.out))} <= moved  # the zero projections
    with torch.no_grad():
        out = model(x, t, full)
        assert not torch.allclose(out, base(x, t, cond))
        assert not torch.allclose(out, model(x, t, {**cond, "control": torch.randn_like(x)}))
        assert torch.equal(model(x, t, cond), base(x, t, cond))


def test_features_follow_the_docstring_equations():
    """An independent evaluation with the model's own modules: patchify by reshape, stages, x += s Z_j F_j."""
    changes, base, model, (x, t, cond), control = _adapted("dit_text", blocks=[1, 3])
    _train(model.adapter)
    a, p = model.adapter, model.config.patch_size
    with torch.no_grad():
        full = {**cond, "control": control, "control_scale": 0.6}
        tokens, c, mod, text, mask = model.embed(x, t, full)
        B, C, H, W = control.shape
        patches = control.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p,
                                                                                                H // p, W // p)
        f = a.conv_in(patches)
        feats = {}
        for j, k in enumerate([1, 3]):
            f = f + a.stages[j].conv2(torch.relu(a.stages[j].conv1(f)))
            feats[k] = a.out[j](f.flatten(2).transpose(1, 2))
        xs = tokens
        for i, block in enumerate(model.blocks):
            xs = block(xs + 0.6 * feats[i] if i in feats else xs, mod, text, mask)
        torch.testing.assert_close(model(x, t, full), model.final(xs, c, x.shape[-2:]), rtol=0, atol=1e-6)
    assert all(torch.equal(u, v) for u, v in zip(model.blocks.parameters(), base.blocks.parameters()))


def test_the_adapter_is_a_small_share():
    _, _, model, _, _ = _adapted("dit_class")
    shares = {"DiT-T/2": _share(model)}
    cfg = load_config(None, ["model.name=DiT-XL/2", "model.cond=class", "model.num_classes=1000"])
    xl = registry.build(*registry.arch_config(cfg.model, 0))  # on the meta device: shapes only
    shares["DiT-XL/2"] = _share(apply_changes(xl, [T2IAdapter(T2IAdapterArgs(), 0)], seed=0))
    print("T2I-Adapter trainable share at the defaults: " + ", ".join(f"{k} {v:.4f}" for k, v in shares.items()))
    assert all(0 < s < 0.05 for s in shares.values()), shares


def _share(model) -> float:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad)
            / sum(p.numel() for p in model.parameters()))


def test_composes_with_a_controlnet_and_the_export_reads_back(tmp_path):
    cfg = tiny(depth=3, num_classes=5)
    model = copy.deepcopy(random_model(cfg, seed=1))
    apply_changes(model, [ControlNet(ControlNetArgs(layers=1), 0), T2IAdapter(T2IAdapterArgs(channels=8), 1)], 0)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"adapter"}  # the later trains
    _train(model.control, 2)
    _train(model.adapter, 3)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    cond = {"class_labels": torch.tensor([1, 2]), "control": torch.randn(2, 4, 8, 8, generator=g)}
    name, lines = save_served(model.eval(), model.state_dict(), tmp_path)  # difftrain export's path
    assert "T2I-Adapter (blocks [0, 1], 8 channels)" in lines and "ControlNet (1 blocks)" in lines
    fresh = random_model(cfg, seed=5)
    fresh.load_state_dict(fresh.load_diffusers(tmp_path))  # the base alone: the exported diffusers folder
    load_served(fresh, tmp_path, "cpu")  # difftrain sample EXPORT's path: both modules back
    assert fresh.control is not None and fresh.adapter is not None
    with torch.no_grad():
        assert torch.equal(fresh(x, t, cond), model(x, t, cond))
        del model.adapter
        assert not torch.allclose(fresh(x, t, cond), model(x, t, cond))  # the adapter acts
    save_served(model, model.state_dict(), tmp_path)  # the same folder, now without an adapter
    assert not (tmp_path / "t2i_adapter").exists()
    fresh = random_model(cfg, seed=5)
    load_served(fresh, tmp_path, "cpu")
    assert getattr(fresh, "adapter", None) is None and fresh.control is not None


@pytest.mark.parametrize("family,kw,message", [
    ("unet", {}, "'adapt[0].kind' = t2i_adapter: built for the image DiT, not UNet"),
    ("dit_video", {}, "'adapt[0].kind' = t2i_adapter: built for the image DiT, not VideoDiT"),
    ("dit_class", {"blocks": [1, 4]}, "'adapt[0].blocks': 4 is not a block index of the model (0..3)"),
])
def test_bad_entries_are_one_line_errors(family, kw, message):
    _, base, _ = _model(family, "[]")
    with pytest.raises(ConfigError) as e:
        apply_changes(base, [T2IAdapter(T2IAdapterArgs(**kw), 0)], seed=0)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="adapt\\[0\\].channels"):
        changes_of(type("Cfg", (), {"adapt": [{"kind": "t2i_adapter", "channels": -1}]})())


TA = 'adapt=[{"kind":"t2i_adapter"}]'


@pytest.mark.parametrize("overrides,message", [
    ([TA], "'adapt[0].kind' = t2i_adapter needs control images: set data.control"),
    ([TA, "data.control=edges", "stage=reflow"], "t2i_adapter trains with stage pretrain"),
    ([TA, "data.control=edges", "parallel.pp=2"], "'parallel.pp' = 2: a t2i_adapter (adapt[0])"),
])
def test_config_refusals_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
