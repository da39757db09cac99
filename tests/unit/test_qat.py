"""Quantisation-aware training (``quant/``, ``adapt: [{kind: qat}]``), REFERENCES F's oracles: fake quantisation is
idempotent with at most 2^b levels per step size, the STE gradient is 1 inside the clipping range and 0 outside,
LSQ's step-size gradient is the paper's closed form (Esser et al. 2020, Eq. 3 times Eq. 4's g), a sample whose t
lies in interval k uses step size k, loading step sizes learnt for another interval count is a one-line error, the
converted model's outputs equal the prepared model's, a fresh 16-bit model is the base to rounding, and bad entries
are one-line errors naming ``adapt[i].KEY``."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes
from difftrain.quant.fake import fake_quant, grouped, int_range, to_ints
from difftrain.quant.modules import ActQuant, Quantised, TimeContext, WeightQuant
from tests.unit.test_lora import FAMILIES as LORA_FAMILIES, _model

SCHEMES = [(4, True, "channel"), (4, False, "group"), (3, True, "tensor"), (8, False, "channel"), (2, True, "group")]


def _qat(family: str, entry: str):
    cfg, base, inputs = _model(family, f"[{{kind: qat, {entry}}}]")
    changes = changes_of(cfg)
    return base, apply_changes(copy.deepcopy(base), changes, seed=0), changes, inputs


@pytest.mark.parametrize("bits,symmetric,granularity", SCHEMES)
def test_fake_quant_is_idempotent_with_at_most_2_to_the_b_levels_per_step(bits, symmetric, granularity):
    w = torch.randn(8, 4, 3, 3) * torch.rand(8, 1, 1, 1) * 3  # a Conv2d weight, channels of different ranges
    wq = WeightQuant(w, bits, symmetric, granularity, group_size=12)
    with torch.no_grad():
        wq.log_scale.add_(math.log(0.7))  # clip part of the range (a trained step size), so clipping is exercised too
        q = wq(w)
        assert torch.equal(wq(q), q)
        groups = grouped(q, granularity, 12).reshape(-1, grouped(q, granularity, 12).shape[-1])
        counts = [g.unique().numel() for g in groups]
        assert max(counts) <= 2 ** bits and max(counts) >= min(2 ** bits, groups.shape[1]) // 2
        qmin, qmax = int_range(bits, symmetric)
        k = to_ints(grouped(w, granularity, 12), wq.scale, wq.zero, qmin, qmax)  # the integers an export holds
        z = torch.round(wq.zero) if wq.zero is not None else 0.0
        torch.testing.assert_close(grouped(q, granularity, 12), wq.scale * (k - z), rtol=0, atol=0)
        assert k.min() >= qmin and k.max() <= qmax


def test_ste_gradient_is_one_inside_the_clip_range_and_zero_outside():
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    s = torch.tensor(0.2)
    qmin, qmax = int_range(4, True)  # [-8, 7]: x̂ ∈ [-1.6, 1.4]
    fake_quant(x, s, None, qmin, qmax, g=1.0).sum().backward()
    inside = (x > qmin * s) & (x < qmax * s)
    outside = (x < qmin * s - 1e-6) | (x > qmax * s + 1e-6)
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_step_gradient_is_the_papers_closed_form(symmetric):
    """∂x̂/∂s = round(v/s) − v/s inside, q_min − z or q_max − z outside (LSQ Eq. 3 with a zero point), summed over the
    values and times g = 1/sqrt(N Q_P) (Eq. 4-5)."""
    torch.manual_seed(0)
    x = torch.randn(1000) * 2
    qmin, qmax = int_range(4, symmetric)
    s = torch.tensor(0.15, requires_grad=True)
    z = None if symmetric else torch.tensor(7.3, requires_grad=True)
    g = 1 / math.sqrt(x.numel() * qmax)
    fake_quant(x, s, z, qmin, qmax, g).sum().backward()
    zi = 0.0 if symmetric else 7.0
    u = x / s.detach()
    v = u + zi  # the integer-domain value before clipping
    want = torch.where(v < qmin, qmin - zi, torch.where(v > qmax, qmax - zi, torch.round(u) - u))
    torch.testing.assert_close(s.grad, g * want.sum(), rtol=1e-5, atol=1e-7)
    if not symmetric:  # x̂ = s (clip(round(x/s) + z) − z): −s where clipped, 0 inside
        torch.testing.assert_close(z.grad, g * (-s.detach() * ((v < qmin) | (v > qmax)).float()).sum())


def test_activation_step_sizes_start_from_the_first_batch():
    aq = ActQuant(8, True, 1, 1.0, None, "adapt[0]")
    x = torch.randn(4, 10) * 5
    aq(x)
    torch.testing.assert_close(aq.scale, (x.abs().max() / 127).reshape(1))
    x2 = torch.randn(4, 10) * 50  # calibrated once: a later batch leaves the step size alone
    aq(x2)
    torch.testing.assert_close(aq.scale, (x.abs().max() / 127).reshape(1))
    asym = ActQuant(8, False, 1, 1.0, None, "adapt[0]")
    y = torch.rand(4, 10) * 3 - 0.5
    asym(y)
    assert torch.allclose(asym(y), y, atol=asym.scale.item() / 2 + 1e-6)  # the whole range, half a step apart


def test_a_sample_in_interval_k_uses_step_size_k():
    clock = TimeContext()
    aq = ActQuant(4, True, 4, 1.0, clock, "adapt[0]")
    with torch.no_grad():
        aq.step0.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    aq.calibrated.fill_(True)
    clock.t = torch.tensor([0.0, 0.26, 0.74, 1.0])  # intervals 0, 1, 2 and (t = 1) the last
    x = torch.randn(8, 5, 6)  # a batch of 2 B rows, b-major (a video block's (B·frames))
    out = aq(x)
    for row, k in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):
        s = torch.tensor(0.1 * (k + 1))
        torch.testing.assert_close(out[row], fake_quant(x[row], s, None, -8, 7, 1.0))


def test_the_model_forward_sets_t_and_each_copy_reads_its_own():
    base, model, changes, (x, t, cond) = _qat("dit_class", "weight_bits: 8, act_bits: 8, t_intervals: 4")
    t = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        before = model(x, t, cond)
        for m in model.modules():
            if isinstance(m, ActQuant):
                m.log_scale[0] += math.log(3)  # interval 0 (t = 0.1) only
        after = model(x, t, cond)
        assert not torch.allclose(after[0], before[0]) and torch.equal(after[1], before[1])
        twin = copy.deepcopy(model)  # an EMA / target copy
        twin(x, torch.tensor([0.5, 0.5]), cond)
        clocks = {id(m.clock) for m in model.modules() if isinstance(m, ActQuant)}
        assert len(clocks) == 1 and torch.equal(next(m.clock for m in model.modules()
                                                     if isinstance(m, ActQuant)).t, t)


def test_scales_for_another_interval_count_are_a_one_line_error():
    _, four, _, inputs = _qat("dit_class", "act_bits: 8, t_intervals: 4")
    _, two, _, _ = _qat("dit_class", "act_bits: 8, t_intervals: 2")
    with pytest.raises(ConfigError, match=r"adapt\[0\]\.t_intervals' = 2, .* learnt for 4 t-intervals") as e:
        two.load_state_dict(four.state_dict())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family,entry", [
    ("dit_class", "weight_bits: 4, granularity: group, group_size: 32"),
    ("unet", "weight_bits: 4, symmetric: false"),
    ("dit_text", "weight_bits: 4, act_bits: 8, t_intervals: 4, act_symmetric: false"),
    ("unet", "weight_bits: 4, act_bits: 6, t_intervals: 8, granularity: tensor"),
])
def test_converted_equals_prepared(family, entry):
    base, model, changes, (x, t, cond) = _qat(family, entry)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(1):  # a trained model: weights, step sizes and zero points have moved
        opt.zero_grad()
        model(x, t, cond).square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())  # QAT trains everything (owns: all)
        opt.step()
    assert all(changes[0].owns(n) for n, _ in model.named_parameters())
    with torch.no_grad():
        prepared = model(x, t, cond)
        converted = merge_changes(copy.deepcopy(model), changes)
        torch.testing.assert_close(converted(x, t, cond), prepared, rtol=0, atol=1e-6)
    layers = [m for m in converted.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if "act_bits" not in entry:  # weights only: the plain architecture, weights on the integer grid
        assert changes[0].mergeable and set(converted.state_dict()) == set(base.state_dict())
        assert not any(isinstance(m, Quantised) for m in layers)
    else:  # the activation quantisers stay (the served model quantises its inputs)
        assert not changes[0].mergeable and all(m.weight_quant is None for m in layers if isinstance(m, Quantised))
    edges = {"dit_class": "final_layer.linear", "dit_text": "patch_embed", "unet": "inner.conv_in"}[family]
    assert not isinstance(converted.get_submodule(edges), Quantised)  # input / output layers stay float


def test_a_fresh_16_bit_model_is_the_base_and_4_bit_is_not():
    base, w16, _, (x, t, cond) = _qat("unet", "weight_bits: 16, act_bits: 16, t_intervals: 2")
    _, w4, _, _ = _qat("unet", "weight_bits: 4, act_bits: 4")
    with torch.no_grad():
        ref = base(x, t, cond)
        torch.testing.assert_close(w16(x, t, cond), ref, rtol=0, atol=1e-3 * ref.abs().max().item())
        assert (w4(x, t, cond) - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("entry,key", [
    ("weight_bits: 1", "weight_bits"),
    ("act_bits: 1", "act_bits"),
    ("t_intervals: 4", "t_intervals"),
    ("granularity: row", "granularity"),
    ("granularity: group, group_size: 7", "group_size"),
    ("targets: [nothing_here]", "targets"),
    ("targets: ['(']", "targets"),
    ("bits: 4", "bits"),
])
def test_bad_entries_are_one_line_errors(entry, key):
    with pytest.raises(ConfigError, match=rf"adapt\[0\]\.{key}") as e:
        _qat("dit_class", entry)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra,match", [
    (["adapt=[{kind: qat}, {kind: lora}]"], r"adapt\[0\]': qat with lora .*QALoRA"),
    (["adapt=[{kind: qat, act_bits: 8}]", "parallel.engine=fsdp2"], r"adapt\[0\]\.act_bits'.*DDP only"),
])
def test_what_is_not_built_yet_is_refused_in_one_line(extra, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10", *extra])
    assert "\n" not in str(e.value)


def test_export_refuses_activation_quantisers_in_one_line():
    """A weights-only run exports its folded weights; one with activation quantisers is refused (no diffusers folder
    holds them), naming the change."""
    weights, acts = (changes_of(load_config(None, [*LORA_FAMILIES["dit_class"], f"adapt=[{e}]"]))[0] for e in
                     ("{kind: qat, weight_bits: 8}", "{kind: qat, weight_bits: 8, act_bits: 8}"))
    assert weights.export_refusal() is None
    assert "adapt[0] quantises activations (act_bits=8)" in acts.export_refusal()
