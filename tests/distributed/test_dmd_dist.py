"""The dmd stage (distribution matching distillation) under the real launcher: its two trainable networks, the
generator and the fake score, on 2 ranks (DDP and FSDP2) equal one process; they really alternate (fake-score steps
leave the generator and its optimizer state untouched); a run killed mid-stage resumes bitwise (both networks, their
EMAs, the optimizer); and sample serves the generator in one DDIM step with CFG distilled in. Small
class-conditional DiT on the digits (tests/distributed/test_resume.py's COMMON)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from difftrain.train import checkpoint as ckpt
from tests.conftest import run_cmd, torchrun
from tests.distributed.test_resume import COMMON, checkpoint, part

SMALL = " ".join(COMMON) + " optim.eps=1e-6 data.streams=2"  # data.streams fixed: the same batches on 1 and 2 ranks
# steps 0, 1 fake-score steps, step 2 a generator step, 3, 4 fake, 5 generator. The warm-up spans the resume at 3, so
# a resumed run must also take the schedule up where it was (after 3 updates: one the generator's, two the fake's).
DMD = "stage=dmd stage_args.fake_updates=2 stage_args.teacher_guidance=2 optim.warmup_steps=6 run.steps=6"


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """Three launches: one process (a teacher of 8 steps, then its DMD student, checkpointed after every step),
    2 FSDP2 ranks of the student killed on rank 1 at step 4 (a checkpoint at 3), then 2 ranks (the student on DDP
    and FSDP2, and the killed run again, which resumes). Returns (dir, the kill's exit code, its newest checkpoint)."""
    out = tmp_path_factory.mktemp("dmd")
    base = f"{SMALL} data.train={digits['train']}"
    dmd = f"{base} {DMD} stage_args.teacher={out}/teacher@ema"
    fsdp2 = f"{dmd} parallel.engine=fsdp2 run.ckpt_every=3"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "teacher", f"{base} run.steps=8 run.dir={out}/teacher",
                 "dmd", f"{dmd} run.ckpt_every=1 run.keep_last=0 run.dir={out}/single"])
    killed = torchrun(2, ["-m", "difftrain", "train", *fsdp2.split(), f"run.dir={out}/killed"],
                      env={"DIFFTRAIN_FAULT": "kill_at_step:4:1"}, check=False)
    left = ckpt.latest_checkpoint(out / "killed" / "checkpoints")
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "ddp", f"{dmd} run.dir={out}/ddp",
                 "fsdp2", f"{fsdp2} run.dir={out}/fsdp2",
                 "resumed", f"{fsdp2} run.dir={out}/killed"])
    return out, killed.returncode, left and left.name


def differing(a: dict, b: dict) -> list[str]:
    """The keys whose tensors are not bitwise equal, with their largest difference."""
    assert a and a.keys() == b.keys()
    return [f"{k} by {(a[k].double() - b[k].double()).abs().max().item():.3g}"
            for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_generator_and_fake_score_on_two_ranks_equal_one_process(runs, engine):
    out, _, _ = runs
    (ref, _), (got, state) = checkpoint(out / "single"), checkpoint(out / engine)
    teacher = part(checkpoint(out / "teacher")[0], "ema.backbone.")
    assert state["step"] == 6 and state["world_size"] == 2
    for module in ("generator", "fake"):
        r, g = part(ref, f"model.{module}."), part(got, f"model.{module}.")
        assert r and r.keys() == g.keys() == teacher.keys()
        assert differing(r, teacher), f"{module} did not train away from the teacher"
        for k in r:
            diff = (r[k] - g[k]).abs().max().item()
            assert diff <= 1e-5, f"{engine}: {module}.{k} differs by {diff}"


@pytest.mark.slow
def test_fake_score_steps_leave_the_generator_and_its_optimizer_state_alone(runs):
    out, _, _ = runs
    teacher = part(checkpoint(out / "teacher")[0], "ema.backbone.")
    two, _ = checkpoint(out / "single", step=2)  # steps 0 and 1: fake-score steps
    assert not differing(part(two, "model.generator."), teacher)  # bitwise: no update, no weight decay
    assert differing(part(two, "model.fake."), teacher)
    params = {k.rsplit(".", 1)[0] for k in part(two, "optim.fake.")}
    assert params and params <= part(two, "model.fake.").keys()
    assert all(two[f"optim.fake.{p}.step"].item() == 2 for p in params)
    assert not part(two, "optim.generator.")  # no Adam state for a module that never got a gradient
    three, _ = checkpoint(out / "single", step=3)  # step 2: the first generator step
    assert differing(part(three, "model.generator."), teacher)
    assert not differing(part(three, "model.fake."), part(two, "model.fake."))  # the fake score waits its turn
    gen = {k.rsplit(".", 1)[0] for k in part(three, "optim.generator.")}
    assert gen == params  # the same architecture, its own Adam state
    assert all(three[f"optim.generator.{p}.step"].item() == 1 and three[f"optim.fake.{p}.step"].item() == 2
               for p in params)


@pytest.mark.slow
def test_killed_mid_stage_resumes_bitwise(runs):
    out, code, left = runs
    assert code != 0 and left == "step_00000003"
    (ref, s1), (got, s2) = checkpoint(out / "fsdp2"), checkpoint(out / "killed")
    assert s1["step"] == s2["step"] == 6
    for prefix in ("model.generator.", "model.fake.", "ema.generator.", "ema.fake.", "optim.generator.", "optim.fake."):
        bad = differing(part(ref, prefix), part(got, prefix))
        assert not bad, f"after the resume {len(bad)} tensors of {prefix}* differ: {', '.join(bad[:3])}"
    assert not any(k.startswith(("model.teacher", "optim.teacher", "ema.teacher")) for k in got)


@pytest.mark.slow
def test_sample_serves_the_generator_in_one_step_with_cfg_distilled_in(runs, tmp_path):
    out, _, _ = runs
    state = ckpt.read_train_state(ckpt.latest_checkpoint(out / "single" / "checkpoints"))
    assert state["stage"] == "dmd" and state["served"] == "generator"
    assert state["sampling"] == {"sampler": "ddim", "steps": 1, "guidance": 1.0}
    assert state["modules"] == {"generator": "trainable", "fake": "trainable", "teacher": "frozen"}
    assert state["frozen"]["teacher"]["source"] == f"{out}/teacher@ema"
    run_cmd([sys.executable, "-m", "difftrain", "sample", str(out / "single"), "--num", "4", "--out", str(tmp_path)])
    images = np.load(tmp_path / "samples.npz")["images"]
    assert len(images) == 4 and np.isfinite(images).all()
