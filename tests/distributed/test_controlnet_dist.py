"""ControlNet under the real launcher (config ``adapt: [{kind: controlnet}]`` with ``data.control``): a base trained
briefly, then a ControlNet fine-tuned from it (``init_from``) on edge maps of the digits computed on the fly, on one
process and on 2 ranks with DDP and FSDP2 (the frozen base and the trainable branch in one sharded model): all end
with the same branch, the base untouched and left out of the checkpoints; ``difftrain sample --control`` with scale 0
(or no control image) gives the base run's samples, with control it does not, and the export serves the same."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_cmd, torchrun
from tests.distributed.test_consistency_dist import assert_close
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import checkpoint, part

pytestmark = pytest.mark.slow  # ~1.5 min alone: the unit tests cover the model change, the loader and the export

CN = 'adapt=[{"kind":"controlnet","layers":1}] data.control=edges optim.lr=1e-2 run.steps=5'


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet")
    base = f"{SMALL} data.train={digits['train']}"
    cn = f"{base} {CN} init_from={out}/base@ema"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "base", f"{base} run.steps=6 run.dir={out}/base",
                 "cn", f"{cn} run.dir={out}/cn_single"])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "cn_ddp", f"{cn} run.dir={out}/cn_ddp",
                 "cn_fsdp2", f"{cn} parallel.engine=fsdp2 run.dir={out}/cn_fsdp2"])
    return out


@pytest.mark.parametrize("run", ["cn_ddp", "cn_fsdp2"])
def test_controlnet_on_two_ranks_equals_one_process_and_trains_only_the_branch(runs, run):
    (one, s1), (two, s2) = checkpoint(runs / "cn_single"), checkpoint(runs / run)
    assert s1["step"] == s2["step"] == 5
    model1, model2 = part(one, "model.backbone."), part(two, "model.backbone.")
    assert model1 and set(model1) == set(model2) and all(k.startswith("control.") for k in model1)
    assert_close(model1, model2, f"{run} branch")
    assert_close(part(one, "ema.backbone."), part(two, "ema.backbone."), f"{run} EMA")
    assert set(part(two, "ema.backbone.")) == set(model1)  # only the branch has an EMA
    assert any(v.abs().sum() > 0 for k, v in model2.items() if "after_proj" in k)  # the zero projections moved


def test_the_base_is_untouched(runs):
    trained = load_file(runs / "single" / "cn.safetensors")  # the trainer's whole model at the end
    ema_base = part(checkpoint(runs / "base")[0], "ema.backbone.")
    assert {k for k in trained if not k.startswith("control.")} == set(ema_base)
    for k, v in ema_base.items():
        assert torch.equal(trained[k], v), k


def test_sample_with_control_scale_window_and_export(runs, tmp_path):
    control = np.zeros((16, 16), np.uint8)
    control[3:13, 7:9] = 255  # an edge map of a "1"
    Image.fromarray(control).save(tmp_path / "control.png")
    run_cmd([sys.executable, "-m", "difftrain", "export", str(runs / "cn_single"), "--out", str(tmp_path / "e")])
    assert (tmp_path / "e" / "controlnet" / "difftrain_controlnet.safetensors").is_file()
    flags = ["--control", str(tmp_path / "control.png")]
    outs = {}
    for name, src, extra in [("base", runs / "base", []), ("none", runs / "cn_single", []),
                             ("zero", runs / "cn_single", [*flags, "--control-scale", "0"]),
                             ("on", runs / "cn_single", flags), ("export", tmp_path / "e", flags),
                             ("late", runs / "cn_single", [*flags, "--control-start", "0.5"])]:
        run_cmd([sys.executable, "-m", "difftrain", "sample", str(src), "--num", "4", "--steps", "4", "--label", "1",
                 "--out", str(tmp_path / name), *extra])
        outs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(outs["none"], outs["base"]) and np.array_equal(outs["zero"], outs["base"])
    assert not np.array_equal(outs["on"], outs["base"])
    assert np.array_equal(outs["export"], outs["on"])
    assert not np.array_equal(outs["late"], outs["on"])  # control on the second half of the steps only
