"""The integer export of a QAT run (``quant/export.py``) and its serving loader (``quant/serve.py``): the loaded
model's outputs equal the converted model's (prepared, then ``merge_changes``) for the DiT and the UNet, W4 (two
values a byte) and W8, symmetric and asymmetric, per-channel, per-tensor and group step sizes, static activation
step sizes over 1 and 4 t-intervals; W4 weights take ≥ 3.5x fewer bytes than float32; a missing, corrupt or replaced
file is a one-line error naming it; ``difftrain export`` on a real QAT run writes the folder and ``difftrain sample``
serves it with the run's own images."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from difftrain.finetune.adapt import merge_changes
from difftrain.models.dit_export import ExportError
from difftrain.quant.export import pack, save_quantized, storage, unpack
from difftrain.quant.fake import int_range
from difftrain.quant.serve import load_quantized
from tests.unit.test_qat import _qat

ARCH = {"dit_class": "dit", "unet": "unet"}


def trained(family: str, entry: str):
    """A prepared QAT model after one SGD step (weights, step sizes and zero points moved; activations
    calibrated), its changes and inputs whose t fall in different intervals."""
    base, model, changes, (x, _, cond) = _qat(family, entry)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    t = torch.tensor([0.1, 0.8])
    model(x, t, cond).square().mean().backward()
    opt.step()
    return model, changes, (x, t, cond)


def export(model, family: str, folder):
    """``save_quantized`` plus the ``difftrain.json`` (arch + model) that ``difftrain export`` writes beside it."""
    summary = save_quantized(model, folder, {"step": 1})
    meta = {"arch": ARCH[family], "model": dataclasses.asdict(model.config), "quantized": summary}
    (folder / "difftrain.json").write_text(json.dumps(meta))
    return summary


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (4, False), (8, True), (8, False)])
def test_pack_round_trips_and_w4_takes_half_a_byte(bits, symmetric):
    qmin, qmax = int_range(bits, symmetric)
    k = torch.randint(qmin, qmax + 1, (7, 3, 5)).float()  # an odd count: the last byte is half padding
    stored = pack(k, bits, symmetric)
    assert torch.equal(unpack(stored, k.shape, bits, symmetric), k)
    if bits <= 4:
        assert stored.dtype == torch.uint8 and stored.numel() == (k.numel() + 1) // 2
    else:
        assert stored.dtype == (torch.int8 if symmetric else torch.uint8)
        assert str(stored.dtype) == f"torch.{storage(bits, symmetric)}"


CASES = [
    ("dit_class", "weight_bits: 4, act_bits: 8"),  # W4 packed, symmetric, per channel; static act, 1 interval
    ("dit_class", "weight_bits: 8, symmetric: false, granularity: group, group_size: 32, act_bits: 8, t_intervals: 4, "
                  "act_symmetric: false"),
    ("unet", "weight_bits: 4, symmetric: false, granularity: group, group_size: 32, act_bits: 8, t_intervals: 4"),
    ("unet", "weight_bits: 8, act_bits: 6"),
    ("unet", "weight_bits: 3, granularity: tensor"),  # weights only
    ("dit_class", "weight_bits: 4, act_bits: 8, tdq: true, act_symmetric: false"),  # TDQ's network of t
]


@pytest.mark.parametrize("family,entry", CASES)
def test_loaded_equals_converted(family, entry, tmp_path):
    model, changes, (x, t, cond) = trained(family, entry)
    export(model, family, tmp_path)
    with torch.no_grad():
        converted = merge_changes(copy.deepcopy(model), changes).eval()
        served = load_quantized(tmp_path, "cpu")
        want = converted(x, t, cond)
        torch.testing.assert_close(served(x, t, cond), want, rtol=0, atol=1e-6)
        if "t_intervals" in entry:  # the served model reads t: other intervals, other outputs, still equal
            t2 = torch.tensor([0.6, 0.3])
            torch.testing.assert_close(served(x, t2, cond), converted(x, t2, cond), rtol=0, atol=1e-6)
            assert (converted(x, t2, cond) - want).abs().max() > 1e-4
    config = json.loads((tmp_path / "quantized" / "quant_config.json").read_text())
    for name, e in config["layers"].items():  # the served layers hold the integers, not a float weight
        layer, n = served.get_submodule(name), torch.Size(e["shape"]).numel()
        assert "weight" not in layer._parameters and type(layer).__name__.startswith("Integer")
        if e["weight"]["bits"] <= 4:
            assert layer.weight_int.dtype == torch.uint8 and layer.weight_int.numel() == (n + 1) // 2
        else:
            assert layer.weight_int.dtype == (torch.int8 if e["weight"]["symmetric"] else torch.uint8)
        assert (layer.weight_zero is None) == e["weight"]["symmetric"]
        assert (e["act"] is None) == ("act_bits" not in entry)
    assert not any(p.requires_grad for p in served.parameters())


def test_qalora_merges_into_the_integers(tmp_path):
    """QALoRA (a LoRA after qat): ``export_qat`` merges the adapter into W before reading the integers of
    Q_w(W + ΔW), so the served model equals the converted one, the adapter included."""
    from difftrain.finetune.adapt import apply_changes, changes_of
    from difftrain.quant.export import export_qat
    from tests.unit.test_lora import _model

    cfg, base, (x, t, cond) = _model("dit_class", "[{kind: qat, weight_bits: 4, act_bits: 8}, "
                                                  "{kind: lora, rank: 4, targets: [attn]}]")
    changes = changes_of(cfg)
    model = apply_changes(copy.deepcopy(base), changes, seed=0)
    model(x, t, cond)  # calibrates the activation step sizes
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter
        converted = merge_changes(copy.deepcopy(model), changes).eval()
        summary, left = export_qat(model, changes, tmp_path, {})
        assert [c.kind for c in left] == ["qat"]
        (tmp_path / "difftrain.json").write_text(json.dumps({"arch": "dit", "model": dataclasses.asdict(
            model.config), "quantized": summary}))
        torch.testing.assert_close(load_quantized(tmp_path, "cpu")(x, t, cond), converted(x, t, cond), rtol=0,
                                   atol=1e-6)


def test_w4_weights_are_at_least_3_5x_smaller_than_float32(tmp_path):
    model, _, _ = trained("dit_class", "weight_bits: 4, granularity: group, group_size: 32")
    summary = export(model, "dit_class", tmp_path)
    config = json.loads((tmp_path / "quantized" / "quant_config.json").read_text())
    stored = 0
    with safe_open(str(tmp_path / "quantized" / "model.safetensors"), "pt") as f:  # the bytes in the file
        for name in config["layers"]:
            for suffix in ("weight_int", "weight_scale", "weight_zero"):
                if f"{name}.{suffix}" in f.keys():
                    stored += f.get_tensor(f"{name}.{suffix}").nbytes
    floats = sum(4 * torch.Size(e["shape"]).numel() for e in config["layers"].values())
    assert stored == summary["weight_bytes"] and floats == summary["float32_weight_bytes"]
    assert floats / stored >= 3.5, floats / stored


def test_a_folded_model_is_refused(tmp_path):
    model, changes, _ = trained("dit_class", "weight_bits: 8, act_bits: 8")
    folded = copy.deepcopy(model)
    for m in folded.modules():
        if getattr(m, "weight_quant", None) is not None:
            m.weight_quant = None
    with pytest.raises(ExportError, match=r"already folded .*merge=False"):
        save_quantized(folded, tmp_path, {})


def _first_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qexport")
    model, _, _ = trained("dit_class", "weight_bits: 4, act_bits: 8")
    export(model, "dit_class", folder)
    return folder


@pytest.mark.parametrize("damage,name", [
    (lambda q: (q / "model.safetensors").unlink(), "model.safetensors"),
    (lambda q: (q / "quant_config.json").unlink(), "quant_config.json"),
    (lambda q: (q / "model.safetensors").write_bytes((q / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors"),
    (lambda q: (q / "quant_config.json").write_text("{not json"), "quant_config.json"),
])
def test_a_missing_or_corrupt_file_is_a_one_line_error_naming_it(exported, tmp_path, damage, name):
    import shutil

    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    damage(folder / "quantized")
    with pytest.raises(ExportError) as e:
        load_quantized(folder, "cpu")
    assert str(folder / "quantized" / name) in _first_line(e)


def test_tensors_that_do_not_fit_the_architecture_are_a_one_line_error(exported, tmp_path):
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    q = folder / "quantized"
    tensors = load_file(str(q / "model.safetensors"))
    tensors["stray"] = torch.zeros(1)
    save_file(tensors, str(q / "model.safetensors"))
    config = json.loads((q / "quant_config.json").read_text())
    config["sha256"] = hashlib.sha256((q / "model.safetensors").read_bytes()).hexdigest()
    (q / "quant_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"model.safetensors does not match the architecture: .*unexpected "
                                          r"\['stray'\]") as e:
        load_quantized(folder, "cpu")
    _first_line(e)


# ------------------------------------------------------------------ difftrain export / sample on real QAT runs
RUNS = {"w4a8": "{kind: qat, weight_bits: 4, act_bits: 8, t_intervals: 2, granularity: group, group_size: 32}",
        "w8": "{kind: qat, weight_bits: 8, symmetric: false}"}


def small_qat_run(digits, run_dir, entry: str) -> None:
    """A real in-process QAT run of 2 steps with the qat ``entry`` (the small DiT of tests/distributed/
    test_resume.py), checkpointed at its end."""
    from difftrain.config_checks import load_config
    from difftrain.train.trainer import Trainer
    from tests.chaos.test_untrusted_files import _close
    from tests.conftest import REPO
    from tests.distributed.test_resume import COMMON

    cfg = load_config(REPO / COMMON[0], [*COMMON[1:], "run.steps=2", "run.ckpt_every=2", "data.num_workers=0",
                                         f"data.train={digits['train']}", f"run.dir={run_dir}", f"adapt=[{entry}]"])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        _close(trainer)


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """Two real QAT runs: W4A8 with timestep-aware activation step sizes, and weights-only W8."""
    d = tmp_path_factory.mktemp("qat_runs")
    for name, entry in RUNS.items():
        small_qat_run(digits, d / name, entry)
    return d


def _outputs(g, seed=0):
    m = g.acfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, m.in_channels, m.image_size, m.image_size, generator=gen)
    with torch.no_grad():
        return g.model(x, torch.tensor([0.1, 0.6, 0.9]), {"class_labels": torch.tensor([1, 2, 10])})


@pytest.mark.parametrize("name", sorted(RUNS))
def test_cli_export_writes_the_integers_and_sample_serves_them(runs, name, tmp_path, capsys):
    import numpy as np

    from difftrain import cli
    from difftrain.eval.generator import load_generator

    run, out = runs / name, tmp_path / "export"
    cli.main(["export", str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    meta = json.loads((out / "difftrain.json").read_text())
    q = meta["quantized"]
    assert f"integer weights (W{4 if name == 'w4a8' else 8}" in printed and str(out / "quantized") in printed
    assert (out / "quantized" / "model.safetensors").is_file() and q["activations"] == (name == "w4a8")
    assert "class" in meta["scheduler"]  # written (or its reason given) as for any export
    if name == "w4a8":  # activation quantisers: no diffusers model at the root, and it says so
        assert q["root"].startswith("none: adapt[0] quantises activations") and meta["diffusers_class"] is None
        assert not (out / "diffusion_pytorch_model.safetensors").exists() and "root diffusers model: none" in printed
        assert q["float32_weight_bytes"] / q["weight_bytes"] >= 3.5
    else:  # weights only: the root diffusers folder holds the same model, its weights dequantised
        import diffusers

        assert q["root"].startswith("the same model") and meta["diffusers_class"]
        plain = getattr(diffusers, meta["diffusers_class"]).from_pretrained(str(out))
        assert sum(p.numel() for p in plain.parameters()) > 0
    served, trained = load_generator(out, torch.device("cpu")), load_generator(run, torch.device("cpu"))
    assert type(served.model.get_submodule("blocks.0.attn.qkv")).__name__ == "IntegerLinear"
    torch.testing.assert_close(_outputs(served), _outputs(trained), rtol=0, atol=1e-6)
    for src, dst in ((out, tmp_path / "s_export"), (run, tmp_path / "s_run")):
        cli.main(["sample", str(src), "--num", "2", "--steps", "2", "--label", "3", "--out", str(dst)])
    images = [np.load(tmp_path / d / "samples.npz")["images"] for d in ("s_export", "s_run")]
    assert np.array_equal(*images) and np.ptp(images[0]) > 0


def test_cli_sample_of_a_damaged_export_is_one_line_naming_the_file(runs, tmp_path, capsys):
    from difftrain import cli

    out = tmp_path / "export"
    cli.main(["export", str(runs / "w4a8"), "--out", str(out)])
    (out / "quantized" / "model.safetensors").write_bytes(b"\0" * 64)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(out), "--num", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "\n" not in err and str(out / "quantized" / "model.safetensors") in err, err


def test_cli_export_of_a_pipeline_with_activation_quantisers_is_refused_in_one_line(runs, tmp_path, capsys):
    from difftrain import cli

    with pytest.raises(SystemExit):
        cli.main(["export", str(runs / "w4a8"), "--out", str(tmp_path / "e"), "--pipeline"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "adapt[0] quantises activations (act_bits=8)" in err, err
    assert not (tmp_path / "e" / "quantized").exists()
