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
from tests.unit.test_lora import _model

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
    aq.eval()  # no calibration: the step sizes above
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
    (["adapt=[{kind: lora}, {kind: qat}]"], r"adapt\[0\]': a LoRA before qat .*put qat first"),
    (["adapt=[{kind: qat}, {kind: lora, dropout: 0.1}]"], r"adapt\[1\]\.dropout': QALoRA"),
    (["adapt=[{kind: qat, act_bits: 8, t_intervals: 4}]", "parallel.activation_checkpointing=true"],
     r"adapt\[0\]': timestep-aware .*activation_checkpointing=false"),
    (["adapt=[{kind: qat, act_bits: 8, t_intervals: 4, tdq: true}]"], r"adapt\[0\]\.tdq'.*choose one"),
    (["adapt=[{kind: qat, tdq: true}]"], r"adapt\[0\]\.tdq'.*set act_bits"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(extra, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, ["model.name=DiT-T/2", "model.cond=class", "model.num_classes=10", *extra])
    assert "\n" not in str(e.value)


def test_calibration_takes_each_intervals_maximum_over_forwards_then_waits_for_unseen_ones_and_writes_no_parameter():
    clock = TimeContext()
    aq = ActQuant(8, True, 4, 1.0, clock, "adapt[0]", calibrate=2)
    with torch.no_grad():
        aq.log_scale.fill_(0.1)  # where an optimizer left it: calibration moves buffers only
    x1, x2, x3 = torch.randn(4, 6), torch.randn(4, 6) * 3, torch.randn(4, 6) * 100
    clock.t = torch.tensor([0.1, 0.1, 0.3, 0.3])  # intervals 0, 0, 1, 1
    aq(x1)
    clock.t = torch.tensor([0.1, 0.6, 0.6, 0.6])  # intervals 0, 2, 2, 2
    aq(x2)
    want = torch.stack([torch.maximum(x1[:2].abs().max(), x2[0].abs().max()), x1[2:].abs().max(),
                        x2[1:].abs().max()])
    torch.testing.assert_close(aq.step0, torch.cat([want, want.max().reshape(1)]) / 127)  # interval 3, unseen:
    clock.t = torch.tensor([0.1, 0.9, 0.9, 0.9])  # the largest seen, until a forward reaches it
    aq(x3)  # a third forward: past the 2 calibration forwards, only the unseen interval 3 calibrates
    torch.testing.assert_close(aq.step0, torch.cat([want, x3[1:].abs().max().reshape(1)]) / 127)
    aq(x3 * 10)  # every interval seen: calibration is over
    torch.testing.assert_close(aq.step0, torch.cat([want, x3[1:].abs().max().reshape(1)]) / 127)
    assert torch.equal(aq.log_scale, torch.full((4,), 0.1)) and int(aq.calibrated) == 3
    fresh = ActQuant(8, True, 4, 1.0, clock, "adapt[0]").eval()
    fresh(x1)  # eval forwards never calibrate (no collective a lone rank would wait on)
    assert int(fresh.calibrated) == 0 and torch.equal(fresh.step0, torch.ones(4))


def test_tdq_starts_as_the_static_step_and_learns_a_function_of_t():
    clock = TimeContext()
    tdq = ActQuant(4, False, 1, 1.0, clock, "adapt[0]", tdq=True)
    static = ActQuant(4, False, 1, 1.0, None, "adapt[0]")
    clock.t = torch.tensor([0.05, 0.95])
    x = torch.randn(2, 16) * 2
    torch.testing.assert_close(tdq(x), static(x), rtol=0, atol=0)  # zero-initialised last layer: the static step
    tdq(x).square().sum().backward()
    assert tdq.tdq.mlp[2].weight.grad.abs().sum() > 0  # the network of t receives LSQ's gradient
    with torch.no_grad():
        tdq.tdq.mlp[2].weight.normal_()
    s, _ = tdq.step_sizes(x)
    assert s[0].item() != s[1].item()  # two t, two step sizes


def test_qalora_with_b_zero_is_the_quantised_model_and_merges_into_integer_weights():
    cfg, base, (x, t, cond) = _model("dit_class", "[{kind: qat, weight_bits: 4, act_bits: 8, t_intervals: 2}, "
                                                  "{kind: lora, rank: 4, targets: [attn, mlp]}]")
    changes = changes_of(cfg)
    naive = apply_changes(copy.deepcopy(base), changes[:1], seed=0)
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), naive(x, t, cond), rtol=0, atol=0)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n for n in trainable) and any("act_quant.log_scale" in n for n in trainable)
    assert any("weight_quant.log_scale" in n for n in trainable)
    assert not any(n.endswith(".weight") and "lora_" not in n and "quant" not in n for n in trainable)  # W frozen
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(2):
        opt.zero_grad()
        model(x, t, cond).square().mean().backward()
        opt.step()
    with torch.no_grad():
        prepared = model(x, t, cond)
        assert not torch.allclose(prepared, naive(x, t, cond))
        converted = merge_changes(copy.deepcopy(model), changes)
        torch.testing.assert_close(converted(x, t, cond), prepared, rtol=0, atol=1e-5)
        layer = converted.get_submodule("blocks.0.attn.qkv")
        assert type(layer).__name__ == "QuantisedLinear" and layer.weight_quant is None  # one folded layer
        wq = model.get_submodule("blocks.0.attn.qkv").base_layer.weight_quant
        levels = grouped(layer.weight, "channel", 32)[0, 0].div(wq.scale[0, 0]).round().unique().numel()
        assert levels <= 16  # W + ΔW on the 4-bit grid


@pytest.mark.parametrize("form", ["dit_class", "unet"])
def test_pipeline_segments_carry_t_to_timestep_aware_quantisers(form):
    from difftrain.parallelism.pipeline.segments import make_segment, num_blocks

    _, model, _, (x, t, cond) = _qat(form, "weight_bits: 8, act_bits: 6, t_intervals: 4")
    with torch.no_grad():
        model(x, torch.full_like(t, 0.5), cond)  # calibrated (every interval from the same batch)
        for m in model.modules():
            if isinstance(m, ActQuant):
                m.log_scale.copy_(torch.tensor([0.0, 0.5, 1.0, 1.5]))  # each interval its own step size
        want = model(x, t, cond)
        cut = num_blocks(model) // 2
        first, last = (make_segment(copy.deepcopy(model), lo, hi) for lo, hi in [(0, cut), (cut, num_blocks(model))])
        keys = ["class_labels"]
        wire = first(x, t, *[cond[k] for k in keys])
        last.clock.t = None  # the second segment learns t from the wire alone
        torch.testing.assert_close(last(*wire), want, rtol=0, atol=1e-5)



def test_an_n_step_grid_takes_n_distinct_intervals_and_a_grid_beyond_the_calibrated_ones_is_refused():
    from difftrain.diffusion.samplers import time_grid
    from difftrain.quant.modules import check_sampling_grid, interval

    ts = time_grid(6, 1.0, 0.0)[:-1].float()  # the points an N-step sampler evaluates: 1, 5/6, ..., 1/6
    assert interval(ts, 6).tolist() == [5, 4, 3, 2, 1, 0]
    _, model, _, (x, _, cond) = _qat("dit_class", "weight_bits: 8, act_bits: 8, t_intervals: 6, calibrate: 3")
    for t in ts[:3]:  # calibrated on the first half of the trajectory only: t ∈ (1/2, 1]
        model(x, t.expand(2), cond)
    check_sampling_grid(model, ts[:3])
    with pytest.raises(ConfigError, match=r"adapt\[0\]: .* calibrated for t-intervals \[3, 4, 5\] of 6; sampling "
                                          r"evaluates t = 0.5 in interval 2") as e:
        check_sampling_grid(model, ts)
    assert "\n" not in str(e.value)
