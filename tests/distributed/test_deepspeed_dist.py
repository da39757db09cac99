"""The DeepSpeed ZeRO engine (``parallel.engine=deepspeed``, train/deepspeed_engine.py) under the real launcher, in
one torchrun launch of 2 gloo ranks, rank 1's loss made NaN at step 4 in every run (DIFFTRAIN_FAULT): ZeRO stages 1,
2 and 3 for 5 steps equal our DDP run within fp32 tolerance (model, EMA and AdamW moments, read from our DCP
checkpoints), each skipping step 4 on both ranks, also with CPU offload (ZeRO-2 with the optimizer offloaded, ZeRO-3
with the optimizer and the parameters: DeepSpeedCPUAdam's AdamW); a ZeRO-3 run stopped at step 3 and resumed to 5
equals the uninterrupted one bitwise, and its step-3 checkpoint resumed by one rank (a second launch, the loss made NaN
at step 4 on that rank), under ZeRO-3 with both offloads and under DDP, equals it within fp32 tolerance; under ZeRO-3 a progressive-distillation student beside its frozen teacher and LoRA adapters
over a frozen base equal DDP, and only the trained parameters have optimizer state; the EMA is partitioned; the
checkpoints are ours (COMPLETE marker, DCP, none of DeepSpeed's pickled files), under TorchEngine's keys."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from difftrain.config_checks import load_config
from difftrain.train.deepspeed_engine import DeepSpeedEngine

from tests.conftest import REPO, torchrun
from tests.distributed.test_consistency_dist import CD, assert_close
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import checkpoint, part

pytestmark = pytest.mark.slow

STEPS = "run.steps=5 run.ckpt_every=0"
# every parameter partitioned (DeepSpeed keeps those under 1e5 elements whole by default: all of this small model's)
DS3 = "parallel.engine=deepspeed parallel.zero_stage=3 parallel.zero_persistence_threshold=0"
PD = "stage=progressive stage_args.steps=2 diffusion.target=v diffusion.weighting=truncated_snr"
OFFLOAD, OFFLOAD_PARAMS = "parallel.zero_offload_optimizer=true", "parallel.zero_offload_params=true"
LORA = 'adapt=[{"kind":"lora","rank":4,"alpha":8,"targets":["attn","mlp","modulation"]}] optim.lr=1e-2'


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    base = f"{SMALL} data.train={digits['train']} {STEPS}"
    ds = "parallel.engine=deepspeed parallel.zero_stage="
    grid = "run.sample_every=5 run.sample_num=4 run.sample_steps=3"  # the EMA sample grid (EMA swapped in)
    cases = ["ddp", f"{base} {grid} run.dir={out}/ddp"]
    for z in (1, 2):
        cases += [f"zero{z}", f"{base} {ds}{z} run.dir={out}/zero{z}"]
    cases += ["zero2_offload", f"{base} {ds}2 {OFFLOAD} run.dir={out}/zero2_offload",
              "zero3_offload", f"{base} {DS3} {OFFLOAD} {OFFLOAD_PARAMS} run.dir={out}/zero3_offload"]
    cases += ["zero3", f"{base} {DS3} {grid} run.dir={out}/zero3",
              "zero3_whole", f"{base} {ds}3 {grid} run.dir={out}/zero3_whole",  # small parameters kept whole
              "resume_a", f"{base} {DS3} run.steps=3 run.dir={out}/zero3_resumed",
              "resume_b", f"{base} {DS3} run.dir={out}/zero3_resumed"]
    for name, args in (("pd", f"{PD} stage_args.teacher={out}/ddp@ema"), ("lora", f"{LORA} init_from={out}/ddp@ema")):
        cases += [f"{name}_ddp", f"{base} {args} run.dir={out}/{name}_ddp",
                  f"{name}_zero3", f"{base} {args} {DS3} run.dir={out}/{name}_zero3"]
    cd = f"{base} {CD} stage_args.teacher={out}/ddp@ema"  # a target network (derived module) beside ZeRO-2
    cases += ["cd_ddp", f"{cd} run.dir={out}/cd_ddp", "cd_zero2", f"{cd} {ds}2 run.dir={out}/cd_zero2"]
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"), *cases], env={"DIFFTRAIN_FAULT": "nan_loss:4:1"})
    # the ZeRO-3 checkpoint of step 3 (2 ranks) resumed by 1 rank: under ZeRO-3 with both offloads, and under DDP
    one = {"zero3_on_1": f"{DS3} {OFFLOAD} {OFFLOAD_PARAMS}", "ddp_from_zero3": ""}
    for name in one:
        shutil.copytree(out / "zero3_resumed" / "checkpoints" / "step_00000003",
                        out / name / "checkpoints" / "step_00000003")
    torchrun(1, ["tests/distributed/train_job.py", str(out / "one"),
                 *[w for name, args in one.items() for w in (name, f"{base} {args} run.dir={out}/{name}")]],
             env={"DIFFTRAIN_FAULT": "nan_loss:4:0"})  # step 4 skipped, as the 2-rank runs skip it
    return out


@pytest.mark.parametrize("zero", ["1", "2", "3", "3_whole", "2_offload", "3_offload"])
def test_zero_stage_equals_ddp(runs, zero):
    (ref, s1), (got, s2) = checkpoint(runs / "ddp"), checkpoint(runs / f"zero{zero}")
    assert s1["step"] == s2["step"] == 5 and s1["updates"] == s2["updates"] == 4  # step 4 skipped on both ranks
    for prefix in ("model.backbone.", "ema.backbone."):
        assert_close(part(ref, prefix), part(got, prefix), f"zero{zero} {prefix}")
    # the same optimizer state, whole and keyed as TorchEngine keys it (exp_avg/exp_avg_sq per parameter)
    moments = {k: v for k, v in part(ref, "optim.").items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert_close(moments, {k: part(got, "optim.")[k] for k in moments}, f"zero{zero} optim", tol=1e-4)


@pytest.mark.parametrize("run", ["pd", "lora"])
def test_zero3_with_frozen_modules_equals_ddp_and_optimizes_only_what_trains(runs, run):
    (ref, s1), (got, s2) = checkpoint(runs / f"{run}_ddp"), checkpoint(runs / f"{run}_zero3")
    assert s1["updates"] == s2["updates"] == 4 and ref.keys() == got.keys()
    trained = "student" if run == "pd" else "backbone"
    for prefix in (f"model.{trained}.", f"ema.{trained}.", "optim."):
        assert_close(part(ref, prefix), part(got, prefix), f"{run} zero3 {prefix}")
    ema = set(part(got, f"ema.{trained}."))  # the EMA covers exactly the trained parameters
    assert ema and {k.rsplit(".", 1)[0] for k in part(got, "optim.")} == {f"{trained}.{k}" for k in ema}
    if run == "pd":
        assert s2["modules"] == {"student": "trainable", "teacher": "frozen"} and not part(got, "model.teacher.")
    else:  # adapters only: the frozen base is neither optimized nor saved
        assert all(".lora_" in k for k in ema) and set(part(got, "model.backbone.")) == ema


@pytest.mark.parametrize("run", ["zero3", "zero3_whole"])
def test_zero3_samples_with_the_ema_like_ddp(runs, run):
    """The sample grid swaps the EMA into the partitions (and into the parameters kept whole): DDP's grid."""
    ref, got = (np.asarray(Image.open(runs / r / "samples" / "step_00000005.png"), dtype=np.int16)
                for r in ("ddp", run))
    assert ref.shape == got.shape and np.abs(ref - got).max() <= 1


def test_zero2_consistency_with_a_target_network_equals_ddp(runs):
    (ref, s1), (got, s2) = checkpoint(runs / "cd_ddp"), checkpoint(runs / "cd_zero2")
    assert s1["step"] == s2["step"] == 6 and ref.keys() == got.keys() and part(got, "derived.target.")
    for prefix in ("model.student.", "ema.student.", "derived.target."):
        assert_close(part(ref, prefix), part(got, prefix), f"consistency zero2 {prefix}")


def test_zero3_ema_is_partitioned(runs):
    full = json.loads((runs / "two" / "ddp.ema_numel.json").read_text())[0]["full"]
    sizes = json.loads((runs / "two" / "zero3.ema_numel.json").read_text())
    assert all(s["local"] <= 0.5 * full * 1.05 for s in sizes), (sizes, full)  # a flat partition per parameter


def test_zero3_resumed_equals_uninterrupted(runs):
    (straight, _), (resumed, s) = checkpoint(runs / "zero3"), checkpoint(runs / "zero3_resumed")
    assert s["step"] == 5 and s["world_size"] == 2
    assert (runs / "zero3_resumed" / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    for prefix in ("model.backbone.", "ema.backbone.", "optim."):
        assert_close(part(straight, prefix), part(resumed, prefix), f"zero3 resumed {prefix}", tol=0.0)


@pytest.mark.parametrize("run", ["zero3_on_1", "ddp_from_zero3"])
def test_zero3_checkpoint_of_two_ranks_resumed_by_one_equals_uninterrupted(runs, run):
    (straight, _), (resumed, s) = checkpoint(runs / "zero3"), checkpoint(runs / run)
    assert s["step"] == 5 and s["updates"] == 4 and s["world_size"] == 1
    assert straight.keys() - resumed.keys() <= {k for k in straight if k.startswith("rng.")}
    for prefix in ("model.backbone.", "ema.backbone."):
        assert_close(part(straight, prefix), part(resumed, prefix), f"{run} {prefix}")
    moments = {k: v for k, v in part(straight, "optim.").items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert_close(moments, {k: part(resumed, "optim.")[k] for k in moments}, f"{run} optim", tol=1e-4)


def test_checkpoints_are_ours_not_deepspeeds_pickles(runs):
    for z in ("1", "2", "3", "3_whole", "2_offload", "3_offload"):
        d = runs / f"zero{z}" / "checkpoints" / "step_00000005"
        names = {p.name for p in d.rglob("*") if p.is_file()}
        assert "COMPLETE" in names and ".metadata" in names
        assert not [n for n in names if n.endswith((".pt", ".pth", ".bin"))], names
        assert not (runs / f"zero{z}" / "checkpoints" / "latest").read_text().startswith("global_step")


@pytest.mark.parametrize("offload", [(OFFLOAD, OFFLOAD_PARAMS), (OFFLOAD_PARAMS,)], ids=["both", "params"])
def test_offload_steps_with_deepspeeds_cpu_adam(world1, monkeypatch, offload):
    """In process (one gloo rank, no launcher): the optimizer offload runs above step with DeepSpeedCPUAdam; the
    parameters alone offload with torch's AdamW."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # the engine sets it without a launcher; undone after the test
    cfg = load_config(REPO / "configs" / "demo.yaml", [*DS3.split(), *offload])
    engine = DeepSpeedEngine("net", nn.Linear(4, 3), cfg.parallel, cfg.optim, torch.device("cpu"), 10, 2, 1)
    inner = engine.optimizer.optimizer
    assert type(inner).__name__ == ("DeepSpeedCPUAdam" if OFFLOAD in offload else "AdamW")
    assert engine.ds.zero_offload_param().device == "cpu"
    assert (engine.ds.zero_offload_optimizer() is not None) == (OFFLOAD in offload)
    loss = engine.model(torch.randn(2, 4)).square().mean()
    engine.backward(loss)
    with engine.accumulating(True):
        pass
    _, ok = engine.step(1, loss)
    assert ok and [s["step"] for s in inner.state.values()] == [1] and int(engine.updates) == 1
