"""QAT with torchao's numerics (``scheme:`` of a qat entry, ``quant/torchao_scheme.py``) and the quantise-on-load
export (``quant/torchao_export.py``): the weight quantiser folds to exactly the integers torchao's PTQ config
computes (Linear and Conv2d), the dynamic activation quantiser is torchao's per-token int8 (a Linear's output equals
torchao's quantised Linear's), converted = prepared, and the exported folder loaded by the stock diffusers class with
the written ``TorchAoConfig`` call holds our integers and gives our converted model's outputs. Settings that disagree
with a scheme are one-line errors naming ``adapt[i].KEY``."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.finetune.adapt import merge_changes
from difftrain.quant.modules import Quantised
from difftrain.quant.torchao_export import export_torchao
from difftrain.quant.torchao_scheme import (TorchaoTokenQuant, TorchaoWeightQuant, base_config, config_source,
                                            torchao_quantisers)
from tests.unit.test_lora_export import _call
from tests.unit.test_qat import _qat

torchao = pytest.importorskip("torchao")
diffusers = pytest.importorskip("diffusers")

ENTRIES = {  # scheme -> the qat entry that states its numerics
    "int8_weight": "scheme: int8_weight",
    "int4_weight": "scheme: int4_weight, weight_bits: 4, granularity: group, group_size: 16",
    "int8_dynamic": "scheme: int8_dynamic, act_bits: 8, act_symmetric: false",
    "int8_dynamic_int4_weight": "scheme: int8_dynamic_int4_weight, weight_bits: 4, act_bits: 8, act_symmetric: false, "
                                "granularity: group, group_size: 16",
}
TOL = 1e-5  # the DiT export's float agreement (test_dit_export): the same weights, diffusers' op order


def _args(entry: str):
    from difftrain.finetune.adapt import changes_of
    from difftrain.config_checks import load_config
    from tests.unit.test_lora import FAMILIES

    return changes_of(load_config(None, [*FAMILIES["dit_class"], f"adapt=[{{kind: qat, {entry}}}]"]))[0].args


def _ptq(weight2d: torch.Tensor, base):
    """torchao's PTQ of a Linear holding ``weight2d``: its quantised weight tensor (what a TorchAoConfig load holds)."""
    from torchao.quantization import quantize_

    holder = nn.Sequential(nn.Linear(weight2d.shape[1], weight2d.shape[0], bias=False))
    with torch.no_grad():
        holder[0].weight.copy_(weight2d)
    quantize_(holder, base)
    return holder


def _trained(family: str, entry: str):
    base, model, changes, inputs = _qat(family, entry)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(*inputs).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # the straight-through gradient reaches every weight
    opt.step()
    return base, model, changes, inputs


@pytest.mark.parametrize("scheme", sorted(ENTRIES))
def test_the_weight_quantiser_folds_to_torchaos_integers_for_linear_and_conv(scheme):
    args = _args(ENTRIES[scheme])
    base = base_config(args)
    g = torch.Generator().manual_seed(0)
    for layer in (nn.Linear(48, 8), nn.Conv2d(4, 8, 3)):  # fan-in 48 and 4·3·3 = 36 (groups of 16 need 48)
        if isinstance(layer, nn.Conv2d) and args.granularity == "group":
            layer = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            rows = torch.rand(8, *[1] * (layer.weight.dim() - 1), generator=g)  # channels of different ranges
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * rows)
        wq, aq = torchao_quantisers(args, layer)
        assert isinstance(wq, TorchaoWeightQuant) and (aq is not None) == (scheme.startswith("int8_dynamic"))
        assert not list(wq.state_dict())  # no step sizes: scales from the weight at every call
        w = layer.weight.detach()
        folded = wq(w)
        ptq = _ptq(w.reshape(8, -1), base)[0].weight
        assert torch.equal(folded.reshape(8, -1), ptq.dequantize())  # exactly torchao's dequantised integers
        k, s, z = wq.ints(w)
        assert torch.equal(k, ptq.qdata) and torch.equal(s, ptq.scale) and torch.equal(z, ptq.zero_point)
        # not a fixed point (unlike LSQ's): torchao's s = max|w| / ((q_max − q_min) / 2) puts the largest |w| at
        # ±(q_max + 0.5), which rounds to q_max or q_min, so the folded weight's own scale is another one. Why the
        # quantise-on-load export writes the unfolded weights: torchao re-quantising the folded ones would move them
        assert not torch.equal(wq.ints(folded)[1], s) and not torch.equal(wq(folded), folded)
        bits = args.weight_bits
        assert k.min() >= -(2 ** (bits - 1)) and k.max() <= 2 ** (bits - 1) - 1 and not z.any()  # symmetric
        groups = k.reshape(8, -1, args.group_size if args.granularity == "group" else k.shape[1])
        assert max(gr.unique().numel() for gr in groups.reshape(-1, groups.shape[-1])) <= 2 ** bits


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_dynamic_int4_weight"])
def test_the_dynamic_activation_quantiser_is_torchaos_per_token_int8(scheme):
    """A prepared Linear equals torchao's quantised Linear (dynamic per-token activations, quantised weights); a
    prepared 1x1 Conv2d is that Linear on each pixel's channels."""
    from difftrain.quant.modules import quantise

    args = _args(ENTRIES[scheme])
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 32, generator=g))
    ref = _ptq(lin.weight.detach(), base_config(args))[0]
    x = torch.randn(2, 5, 32, generator=g) * torch.rand(2, 5, 1, generator=g) * 4  # tokens of different ranges
    conv = nn.Conv2d(32, 8, 1)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.reshape(8, 32, 1, 1))
        conv.bias.copy_(lin.bias)
    quantise(lin, *torchao_quantisers(args, lin))
    quantise(conv, *torchao_quantisers(args, conv))
    assert isinstance(lin.act_quant, TorchaoTokenQuant) and conv.act_quant.conv
    with torch.no_grad():
        want = ref(x) + lin.bias
        assert torch.equal(lin(x), want)
        assert not torch.equal(lin.act_quant(x), x)  # activations really are quantised
        img = x.permute(0, 2, 1).reshape(2, 32, 5, 1)  # 5 pixels of 32 channels
        assert torch.equal(conv.act_quant(img), lin.act_quant(x).permute(0, 2, 1).reshape(2, 32, 5, 1))
        torch.testing.assert_close(conv(img).reshape(2, 8, 5).permute(0, 2, 1), want)  # conv vs matmul order


SLOW = pytest.mark.slow  # ~0.5 min each here: the README's test tier keeps one case per scheme kind


@pytest.mark.parametrize("family,scheme", [("dit_class", "int4_weight"), ("dit_text", "int8_dynamic"),
                                           pytest.param("unet", "int8_dynamic_int4_weight", marks=SLOW),
                                           pytest.param("unet", "int8_weight", marks=SLOW)])
def test_converted_equals_prepared(family, scheme):
    base, model, changes, inputs = _trained(family, ENTRIES[scheme])
    layers = [m for m in model.modules() if isinstance(m, Quantised)]
    assert layers and all(isinstance(m.weight_quant, TorchaoWeightQuant) for m in layers)
    assert any(isinstance(m, nn.Conv2d) for m in layers) == (family == "unet")  # Conv2d layers too
    with torch.no_grad():
        prepared = model(*inputs)
        assert (prepared - base(*inputs)).abs().max() > 1e-3  # quantised (and trained): not the base
        converted = merge_changes(copy.deepcopy(model), changes)
        torch.testing.assert_close(converted(*inputs), prepared, rtol=0, atol=1e-6)
    if scheme.startswith("int8_dynamic"):  # the activation quantisers stay in the served model
        assert not changes[0].mergeable
        assert all(m.weight_quant is None for m in converted.modules() if isinstance(m, Quantised))
    else:
        assert changes[0].mergeable and not any(isinstance(m, Quantised) for m in converted.modules())
        assert set(converted.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("entry,key", [
    ("scheme: int4_weight, granularity: group", "weight_bits"),
    ("scheme: int8_weight, act_bits: 8", "act_bits"),
    ("scheme: int8_dynamic, act_symmetric: false", "act_bits"),
    ("scheme: int8_dynamic, act_bits: 8", "act_symmetric"),
    ("scheme: int8_weight, symmetric: false", "symmetric"),
    ("scheme: int8_weight, granularity: tensor", "granularity"),
    ("scheme: int8_dynamic, act_bits: 8, act_symmetric: false, t_intervals: 4", "t_intervals"),
    ("scheme: int4_weight, weight_bits: 4, granularity: group, group_size: 24", "group_size"),
    ("scheme: int2_weight", "scheme"),
])
def test_settings_that_disagree_with_the_scheme_are_one_line_errors(entry, key):
    with pytest.raises(ConfigError, match=rf"adapt\[0\]\.{key}") as e:
        _qat("dit_class", entry)
    assert "\n" not in str(e.value)


def _load(entry: dict):
    """The export's call, run as written (the stock diffusers class and TorchAoConfig, on CPU)."""
    scope: dict = {}
    exec(entry["imports"] + "\nmodel = " + entry["call"], scope)  # noqa: S102 (our own export's documented call)
    return scope["model"].eval()


@pytest.mark.parametrize("family,scheme,targets", [
    pytest.param("dit_class", "int8_weight", "[all]", marks=SLOW), ("dit_class", "int4_weight", "[all]"),
    pytest.param("dit_text", "int8_dynamic", "[all]", marks=SLOW),
    ("dit_class", "int8_dynamic_int4_weight", "[attn, mlp]"),  # the modulation Linears stay float on load too
    ("unet", "int8_dynamic", "[attn, modulation]"),  # a UNet's Linear layers (TorchAoConfig leaves convs alone)
])
def test_diffusers_torchao_load_holds_our_integers_and_gives_our_outputs(family, scheme, targets, tmp_path):
    from torchao.core.config import config_from_dict
    from torchao.utils import TorchAOBaseTensor

    base, model, changes, inputs = _trained(family, f"{ENTRIES[scheme]}, targets: {targets}")
    entry = export_torchao(model, changes, tmp_path)
    folder = tmp_path / "torchao"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and entry["folder"] == "torchao"
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))  # no pickle
    assert config_from_dict(entry["quant_type"]) == base_config(changes[0].args)  # torchao's JSON form, exact
    imports, expr = config_source(changes[0].args)
    assert expr in entry["call"] and "torch_dtype=torch.float32" in entry["call"]
    assert {"dit_class": "proj_out_2", "dit_text": "proj_out", "unet": "time_embedding.linear_1"}[family] in entry[
        "modules_to_not_convert"]  # the output layer (DiT) / a layer outside targets: float on load
    loaded = _load(entry)
    quantised = {n for n, m in loaded.named_modules() if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)}
    assert quantised == {d for copies in entry["quantised"].values() for ds in copies for d in ds}  # exactly ours
    for ours, copies in entry["quantised"].items():
        k, s, _ = model.get_submodule(ours).weight_quant.ints(model.get_submodule(ours).weight)
        for ds in copies:  # a DiT's t embedder: one copy per block
            for d, rows, scales in zip(ds, k.chunk(len(ds)), s.chunk(len(ds)), strict=True):  # fused qkv: 3 Linears
                w = loaded.get_submodule(d).weight
                assert torch.equal(w.qdata, rows) and torch.equal(w.scale, scales), d  # torchao's integers = ours
    converted = merge_changes(copy.deepcopy(model), changes)
    with torch.no_grad():
        ours = converted(*inputs)
    theirs = _call(loaded, inputs)
    # weight-only: the same dequantised weights, so the export's float agreement (TOL; measured 0.0). Dynamic: the
    # same per-token quantiser on activations that can differ by float rounding (the UNet's time embedding is computed
    # in another order), and an activation on a rounding edge lands one step (its token's range / 255) apart; such
    # flips carried through the network give 1e-3 of the output's range at most (measured: 0.0 for the DiT, 2.4e-4
    # for the UNet)
    tol = 1e-3 * ours.abs().max().item() if scheme.startswith("int8_dynamic") else TOL
    assert (ours - theirs).abs().max().item() <= tol
    assert ours.abs().max() > 0.05


def test_an_export_of_another_run_removes_the_torchao_folder_and_convs_are_refused(tmp_path):
    _, model, changes, _ = _qat("dit_class", ENTRIES["int8_weight"])
    assert export_torchao(model, changes, tmp_path) is not None and (tmp_path / "torchao").is_dir()
    _, plain, lsq, _ = _qat("dit_class", "weight_bits: 8")
    assert export_torchao(plain, lsq, tmp_path) is None and not (tmp_path / "torchao").exists()
    _, unet, changes, _ = _qat("unet", ENTRIES["int8_weight"])
    entry = export_torchao(unet, changes, tmp_path)  # convs: said in difftrain.json, the rest of the export goes on
    assert re.search(r"adapt\[0\] quantised the Conv2d .* TorchAoConfig quantises nn\.Linear", entry["not_written"])
    assert "\n" not in entry["not_written"] and not (tmp_path / "torchao").exists()


def test_cli_export_of_a_real_run_writes_the_folder_torchao_quantises_to_our_integers(digits, tmp_path, capsys):
    """A real 2-step QAT run (scheme int4_weight, the small DiT of tests/distributed/test_resume.py) through
    ``difftrain export``: DIR/torchao loaded by the printed call holds the integers of the run's weights, and gives the
    outputs of the root folder (the converted model, its weights dequantised)."""
    from difftrain import cli
    from difftrain.eval.generator import load_run
    from tests.unit.test_quant_export import small_qat_run

    run, out = tmp_path / "run", tmp_path / "export"
    small_qat_run(digits, run, f"{{kind: qat, {ENTRIES['int4_weight']}}}")
    cli.main(["export", str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    meta = json.loads((out / "difftrain.json").read_text())
    entry, m = meta["torchao"], meta["model"]
    assert f"torchao (int4_weight) in {out / 'torchao'}" in printed and entry["call"] in printed
    loaded = _load(entry)
    trained = load_run(run, torch.device("cpu"), merge=False).model  # the prepared model, EMA weights
    layer = trained.get_submodule("blocks.0.mlp.fc1")
    k, s, _ = layer.weight_quant.ints(layer.weight)
    w = loaded.get_submodule("transformer_blocks.0.ff.net.0.proj").weight
    assert torch.equal(w.qdata, k) and torch.equal(w.scale, s)
    root = getattr(diffusers, entry["diffusers_class"]).from_pretrained(str(out)).eval()  # the converted model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m["in_channels"], m["image_size"], m["image_size"], generator=g)
    inputs = (x, torch.rand(2, generator=g), {"class_labels": torch.tensor([1, m["num_classes"]])})
    theirs = _call(loaded, inputs)
    assert (theirs - _call(root, inputs)).abs().max().item() <= TOL and theirs.abs().max() > 100 * TOL
