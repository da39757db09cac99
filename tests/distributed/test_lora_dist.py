"""LoRA under the real launcher (config key ``adapt``): a base model trained briefly, then LoRA fine-tuning from it
(``init_from``) on one process, on 2 ranks with DDP and FSDP2 (frozen base and trainable adapters in the same
sharded blocks) and pipelined (pp = 2): all end with the same adapters, the base weights untouched, no optimizer
state or EMA for the base; a LoRA consistency-distillation student (LCM-LoRA: consistency + lora, its target
network a LoRA'd copy) on 2 FSDP2 ranks equals one process; a run resumed mid-way ends where an uninterrupted one
does; ``difftrain sample`` and ``export`` serve the merged model."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.conftest import run_cmd, torchrun
from tests.distributed.test_consistency_dist import CD, assert_close
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import checkpoint, part

# JSON (valid YAML without spaces: train_job splits the overrides on whitespace)
LORA = ('adapt=[{"kind":"lora","rank":4,"alpha":8,"targets":["attn","mlp","modulation"]}] optim.lr=1e-2 '
        'run.steps=5')
PP = "parallel.pp=2 parallel.pp_microbatches=2"


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    base = f"{SMALL} data.train={digits['train']}"
    lora = f"{base} {LORA} init_from={out}/base@ema"
    lcm = f'{base} {CD} stage_args.teacher={out}/base@ema adapt=[{{"kind":"lora","rank":4}}]'
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "base", f"{base} run.steps=6 run.dir={out}/base",
                 "lora", f"{lora} run.dir={out}/lora_single",
                 "lcm", f"{lcm} run.dir={out}/lcm_single"])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "lora_ddp", f"{lora} run.dir={out}/lora_ddp",
                 "lora_fsdp2", f"{lora} parallel.engine=fsdp2 run.dir={out}/lora_fsdp2",
                 "lora_pp", f"{lora} {PP} run.dir={out}/lora_pp",
                 "lcm_fsdp2", f"{lcm} parallel.engine=fsdp2 run.dir={out}/lcm_fsdp2",
                 # 3 steps, then resumed to 5: adapters, their optimizer state and EMA come back exactly
                 "resume_a", f"{lora} parallel.engine=fsdp2 run.steps=3 run.dir={out}/lora_resumed",
                 "resume_b", f"{lora} parallel.engine=fsdp2 run.dir={out}/lora_resumed"])
    return out


@pytest.mark.parametrize("run", ["lora_ddp", "lora_fsdp2", "lora_pp", "lora_resumed"])
def test_lora_on_two_ranks_equals_one_process_and_trains_only_the_adapters(runs, run):
    (one, s1), (two, s2) = checkpoint(runs / "lora_single"), checkpoint(runs / run)
    (base, _) = checkpoint(runs / "base")
    assert s1["step"] == s2["step"] == 5
    model1, model2 = part(one, "model.backbone."), part(two, "model.backbone.")
    adapters = {k for k in model1 if ".lora_" in k}
    assert adapters and model1.keys() == model2.keys()
    assert_close(model1, model2, f"{run} model")
    assert_close(part(one, "ema.backbone."), part(two, "ema.backbone."), f"{run} EMA")
    # only the adapters train: they are the EMA's and the optimizer's only parameters; the base is the init's
    assert set(part(two, "ema.backbone.")) == adapters
    assert {k.split(".state.")[0] for k in part(two, "optim.") if ".state." in k} <= {f"backbone.{k}" for k in adapters}
    ema_base = part(base, "ema.backbone.")
    for k, v in model2.items():
        if ".lora_" not in k:
            name = k.replace(".base_layer.", ".")
            assert torch.equal(v, ema_base[name]), f"{run}: base weight {k} moved"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in model2.items() if ".lora_B." in k)


def test_lcm_lora_student_on_two_fsdp2_ranks_equals_one_process(runs):
    """consistency + lora: the student's adapters train, its target network is a LoRA'd copy that follows them."""
    (one, s1), (two, _) = checkpoint(runs / "lcm_single"), checkpoint(runs / "lcm_fsdp2")
    assert s1["modules"] == {"student": "trainable", "teacher": "frozen", "target": "derived"}
    target = part(one, "derived.target.")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in target.items())  # the target followed
    for prefix in ("model.student.", "ema.student.", "derived.target."):
        assert_close(part(one, prefix), part(two, prefix), f"lcm {prefix}")


def test_sample_and_export_serve_the_merged_lora_model(runs, tmp_path):
    """``difftrain sample`` on a LoRA run: the plain architecture with the adapters merged; different from the base
    run's samples (the adapters trained), the same on a rerun and from its export (a plain model folder)."""
    run_cmd([sys.executable, "-m", "difftrain", "export", str(runs / "lora_single"), "--out", str(tmp_path / "e")])
    outs = {}
    for name, src in (("lora", runs / "lora_single"), ("export", tmp_path / "e"), ("base", runs / "base")):
        run_cmd([sys.executable, "-m", "difftrain", "sample", str(src), "--num", "4", "--steps", "2",
                 "--out", str(tmp_path / name)])
        outs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(outs["lora"], outs["export"])
    assert not np.array_equal(outs["lora"], outs["base"])
