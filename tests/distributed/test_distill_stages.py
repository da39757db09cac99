"""The distillation stages under the real launcher: a progressive-distillation student on 2 ranks (DDP and FSDP2)
equals one process, a mid-stage kill and resume equals an uninterrupted run, the frozen teacher is recorded by
source and fingerprint (a changed teacher refuses the resume), and sample/export serve the student at its own step
count. Small class-conditional DiT on the digits (tests/distributed/test_resume.py's COMMON)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from difftrain.train.checkpoint import latest_checkpoint, read_train_state
from tests.conftest import run_cmd, torchrun
from tests.distributed.test_resume import COMMON, assert_same_weights, weights

# data.streams fixed: the same batches on 1 and 2 ranks
SMALL = " ".join(COMMON) + " optim.eps=1e-6 data.streams=2"
PD = "stage=progressive stage_args.steps=2 diffusion.target=v diffusion.weighting=truncated_snr run.steps=6"
PD_PP = "parallel.pp=2 parallel.pp_microbatches=2"
RF = "stage=reflow data.kind=latent data.require_caption=false run.steps=6"


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """A teacher (8 steps), its reflow pairs, then its students on one process and on 2 ranks: progressive (DDP,
    FSDP2) and reflow (FSDP2, a 2-segment pipeline)."""
    out = tmp_path_factory.mktemp("distill")
    base = f"{SMALL} data.train={digits['train']}"
    teacher = out / "teacher"
    student = f"{base} {PD} stage_args.teacher={teacher}@ema"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "teacher", f"{base} run.steps=8 run.dir={teacher}",
                 "pd", f"{student} run.dir={out}/pd_single"])
    run_cmd(["python", "-m", "difftrain", "distill", "pairs", str(teacher), "--out", str(out / "pairs"),
             "--count", "64", "--steps", "4", "--batch", "16", "--shard-size", "32"])
    reflow = f"{SMALL} {RF} data.train={out}/pairs/{{00000..00001}}.tar init_from={teacher}@ema"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"), "rf", f"{reflow} run.dir={out}/rf_single"])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "pd_ddp", f"{student} run.dir={out}/pd_ddp",
                 "pd_fsdp2", f"{student} parallel.engine=fsdp2 run.dir={out}/pd_fsdp2",
                 "rf_fsdp2", f"{reflow} parallel.engine=fsdp2 run.dir={out}/rf_fsdp2",
                 "rf_pp", f"{reflow} parallel.pp=2 parallel.pp_microbatches=2 run.dir={out}/rf_pp",
                 # the teacher's two DDIM steps as frozen work: prefetched into the bubbles, or computed up front
                 "pd_pp_fill", f"{student} {PD_PP} parallel.pp_frozen=fill run.dir={out}/pd_pp_fill",
                 "pd_pp_partition", f"{student} {PD_PP} parallel.pp_frozen=fill parallel.pp_frozen_owners=partition "
                                    f"parallel.pp_frozen_tolerance=10 run.dir={out}/pd_pp_partition",
                 "pd_pp_balanced", f"{student} {PD_PP} parallel.pp_frozen=balanced run.dir={out}/pd_pp_balanced"])
    return out, student


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_progressive_student_on_two_ranks_equals_one_process(runs, engine):
    out, _ = runs
    ref = load_file(str(out / "single" / "pd.safetensors"))
    got = load_file(str(out / "two" / f"pd_{engine}.safetensors"))
    teacher = load_file(str(out / "single" / "teacher.safetensors"))
    assert ref.keys() == got.keys() == teacher.keys()
    assert any(not torch.equal(ref[k], teacher[k]) for k in ref)  # the student trained away from its teacher
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{engine}: {k} differs by {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("frozen", ["fill", "partition", "balanced"])
def test_pipelined_progressive_with_the_teacher_as_frozen_work_equals_one_process(runs, frozen):
    """pp=2: the teacher's steps run as frozen pieces after the encoders (in the previous step's bubbles, held by
    one pp rank with partition, or an equal share per rank up front); the student equals one process."""
    assert_student_equals(runs[0], "pd_single", f"pd_pp_{frozen}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "pp"])
def test_reflow_student_on_two_ranks_and_pipelined_equals_one_process(runs, layout):
    assert_student_equals(runs[0], "rf_single", f"rf_{layout}")


def assert_student_equals(out, single: str, run: str) -> None:
    """The student of run ``run`` ends where the one-process run ``single`` ends (and away from its teacher)."""
    (_, ref), (_, got), (_, teacher) = (weights(out / r, "model") for r in (single, run, "teacher"))
    assert ref.keys() == got.keys() and any(not torch.equal(ref[k], teacher[k]) for k in ref)
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{run}: {k} differs by {diff}"


@pytest.mark.slow
def test_progressive_checkpoint_records_its_teacher_and_resumes_exactly(runs, tmp_path):
    out, student = runs
    state = read_train_state(latest_checkpoint(out / "pd_ddp" / "checkpoints"))
    assert state["stage"] == "progressive" and state["served"] == "student"
    assert state["modules"] == {"student": "trainable", "teacher": "frozen"}
    rec = state["frozen"]["teacher"]
    assert rec["source"] == f"{out}/teacher@ema" and rec["step"] == 8 and len(rec["sha256"]) == 16
    # no teacher weights in the checkpoint: only the student's model, optimizer and EMA tensors
    meta = (latest_checkpoint(out / "pd_ddp" / "checkpoints") / ".metadata").read_bytes()
    assert b"model.student." in meta and b"teacher" not in meta
    # killed mid-stage on rank 1 after step 4 (a checkpoint at 3), then resumed: the same weights as uninterrupted
    args = ["-m", "difftrain", "train", *student.split(), "run.ckpt_every=3",
            f"run.dir={tmp_path}/pd"]
    p = torchrun(2, args, env={"DIFFTRAIN_FAULT": "kill_at_step:4:1"}, check=False)
    assert p.returncode != 0
    torchrun(2, args)
    assert_same_weights(out / "pd_ddp", tmp_path / "pd", step=6)


@pytest.mark.slow
def test_a_changed_teacher_refuses_the_resume_in_one_line(runs, digits, tmp_path):
    out, student = runs
    teacher = tmp_path / "teacher"
    base = f"{SMALL} data.train={digits['train']}"
    run_cmd(["python", "-m", "difftrain", "train", *base.split(), "run.steps=4",
             f"run.dir={teacher}"])
    mine = student.replace(f"{out}/teacher@ema", f"{teacher}@ema").split()
    run_cmd(["python", "-m", "difftrain", "train", *mine, "run.steps=2",
             f"run.dir={tmp_path}/pd"])
    run_cmd(["python", "-m", "difftrain", "train", *base.split(), "run.steps=6",
             f"run.dir={teacher}"])  # the teacher trains on: its newest checkpoint is another one
    p = run_cmd(["python", "-m", "difftrain", "train", *mine, "run.steps=4",
                 f"run.dir={tmp_path}/pd"], check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert "frozen module 'teacher'" in err and "(step 4," in err and "(step 6," in err, err


@pytest.mark.slow
def test_sample_and_export_serve_the_student_at_its_own_step_count(runs, tmp_path):
    out, _ = runs
    run_cmd(["python", "-m", "difftrain", "sample", str(out / "pd_single"), "--num", "4", "--out", str(tmp_path / "s")])
    run_cmd(["python", "-m", "difftrain", "export", str(out / "pd_single"), "--out", str(tmp_path / "e")])
    meta = json.loads((tmp_path / "e" / "difftrain.json").read_text())
    assert meta["stage"] == "progressive"
    assert meta["sampling"] == {"sampler": "ddim", "steps": 2, "guidance": meta["sampling"]["guidance"]}
    run_cmd(["python", "-m", "difftrain", "sample", str(tmp_path / "e"), "--num", "4", "--out", str(tmp_path / "s2")])
    import numpy as np

    a = np.load(tmp_path / "s" / "samples.npz")["images"]
    b = np.load(tmp_path / "s2" / "samples.npz")["images"]
    assert np.array_equal(a, b)  # the export samples as the run does: DDIM, 2 steps, the same weights
