"""ControlNet and T2I-Adapter under the real launcher (config ``adapt: [{kind: controlnet}]`` or
``[{kind: t2i_adapter}]`` with ``data.control``): a base trained briefly, then each change fine-tuned from it
(``init_from``) on edge maps of the digits computed on the fly, on one process and on 2 ranks with DDP and FSDP2 (the
frozen base and the trainable modules in one sharded model): all end with the same change, the base untouched and
left out of the checkpoints; ``difftrain sample --control`` with scale 0 (or no control image) gives the base run's
samples, with control it does not, and the export serves the same. The ControlNet on the class-conditional DiT
(``cn``: PixArt-δ's branch) and on the text UNet (``ucn``: diffusers' ControlNetModel, control in pixels), the
T2I-Adapter on the DiT (``ta``); the DiT's ControlNet also under DeepSpeed ZeRO-3 (``cn_zero3``)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_cmd, torchrun
from tests.distributed.test_consistency_dist import assert_close
from tests.distributed.test_deepspeed_dist import DS3
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import checkpoint, part

pytestmark = pytest.mark.slow  # ~4 min alone: the unit tests cover the model changes, the loader and the export

TRAIN = "data.control=edges optim.lr=1e-2 run.steps=5"
UNET = "model.name=UNet-T model.cond=text model.args={} encoders.text=minilm encoders.text_max_length=8"
BASES = {  # base run: (its model, how sample conditions it)
    "base": ("", ["--label", "1"]),  # the class-conditional DiT
    "ubase": (UNET, ["--prompt", "a handwritten digit 1"]),  # the text UNet
}
CHANGES = {  # run prefix: (adapt entry, its state-dict keys, a zero-initialised projection's keys, its export file,
    #                    its base run)
    "cn": ('adapt=[{"kind":"controlnet","layers":1}]', "control.", "after_proj",
           "controlnet/difftrain_controlnet.safetensors", "base"),
    "ta": ('adapt=[{"kind":"t2i_adapter"}]', "adapter.", ".out.", "t2i_adapter/difftrain_t2i_adapter.safetensors",
           "base"),
    "ucn": ('adapt=[{"kind":"controlnet"}]', "control.", "controlnet_", "controlnet/config.json", "ubase"),
}


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet")
    small = f"{SMALL} data.train={digits['train']}"
    one = [a for b, (model, _) in BASES.items() for a in (b, f"{small} {model} run.steps=6 run.dir={out}/{b}")]
    two = []
    for kind, (entry, *_, base) in CHANGES.items():
        run = f"{small} {BASES[base][0]} {entry} {TRAIN} init_from={out}/{base}@ema"
        one += [kind, f"{run} run.dir={out}/{kind}_single"]
        two += [f"{kind}_ddp", f"{run} run.dir={out}/{kind}_ddp",
                f"{kind}_fsdp2", f"{run} parallel.engine=fsdp2 run.dir={out}/{kind}_fsdp2"]
    # the DiT's ControlNet under DeepSpeed ZeRO-3 (every parameter partitioned; the frozen base outside DeepSpeed)
    run = f"{small} {CHANGES['cn'][0]} {TRAIN} init_from={out}/base@ema"
    two += ["cn_zero3", f"{run} {DS3} run.dir={out}/cn_zero3"]
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"), *one])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"), *two])
    return out


@pytest.mark.parametrize("run", [f"{k}_{e}" for k in CHANGES for e in ("ddp", "fsdp2")] + ["cn_zero3"])
def test_two_ranks_equal_one_process_and_train_only_the_change(runs, run):
    kind = run.split("_")[0]
    _, prefix, zero, _, _ = CHANGES[kind]
    (one, s1), (two, s2) = checkpoint(runs / f"{kind}_single"), checkpoint(runs / run)
    assert s1["step"] == s2["step"] == 5
    model1, model2 = part(one, "model.backbone."), part(two, "model.backbone.")
    assert model1 and set(model1) == set(model2) and all(k.startswith(prefix) for k in model1)
    assert_close(model1, model2, f"{run} {prefix}")
    assert_close(part(one, "ema.backbone."), part(two, "ema.backbone."), f"{run} EMA")
    assert set(part(two, "ema.backbone.")) == set(model1)  # only the change has an EMA
    assert any(v.abs().sum() > 0 for k, v in model2.items() if zero in k)  # the zero projections moved


@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_the_base_is_untouched(runs, kind):
    trained = load_file(runs / "single" / f"{kind}.safetensors")  # the trainer's whole model at the end
    ema_base = part(checkpoint(runs / CHANGES[kind][4])[0], "ema.backbone.")
    assert {k for k in trained if not k.startswith(CHANGES[kind][1])} == set(ema_base)
    for k, v in ema_base.items():
        assert torch.equal(trained[k], v), k


@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_sample_with_control_scale_window_and_export(runs, tmp_path, kind):
    control = np.zeros((16, 16), np.uint8)
    control[3:13, 7:9] = 255  # an edge map of a "1"
    Image.fromarray(control).save(tmp_path / "control.png")
    run, base = runs / f"{kind}_single", CHANGES[kind][4]
    run_cmd([sys.executable, "-m", "difftrain", "export", str(run), "--out", str(tmp_path / "e")])
    assert (tmp_path / "e" / CHANGES[kind][3]).is_file()
    if kind == "ucn":  # diffusers' own ControlNetModel, embedding the pixel-space digits' one channel as they are
        from diffusers import ControlNetModel

        net = ControlNetModel.from_pretrained(str(tmp_path / "e" / "controlnet"))
        assert tuple(net.config.conditioning_embedding_out_channels) == (16,) and net.config.conditioning_channels == 1
    flags = ["--control", str(tmp_path / "control.png")]
    outs = {}
    for name, src, extra in [("base", runs / base, []), ("none", run, []),
                             ("zero", run, [*flags, "--control-scale", "0"]),
                             ("on", run, flags), ("export", tmp_path / "e", flags),
                             ("late", run, [*flags, "--control-start", "0.5"])]:
        run_cmd([sys.executable, "-m", "difftrain", "sample", str(src), "--num", "4", "--steps", "4",
                 *BASES[base][1], "--out", str(tmp_path / name), *extra])
        outs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(outs["none"], outs["base"]) and np.array_equal(outs["zero"], outs["base"])
    assert not np.array_equal(outs["on"], outs["base"])
    assert np.array_equal(outs["export"], outs["on"])
    assert not np.array_equal(outs["late"], outs["on"])  # control on the second half of the steps only
