"""The consistency stage under the real launcher: a consistency-distillation (CD) student with its target network on
2 ranks (DDP and FSDP2) equals one process, consistency training (iCT, no teacher) on 2 FSDP2 ranks equals one
process, a CD run killed mid-stage resumes bitwise (student, EMA, optimizer, target network), and sample/export serve
the students with their multistep consistency samplers at their own step count. Small class-conditional DiT on the
digits (tests/distributed/test_resume.py's COMMON)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difftrain.sampling import generate
from difftrain.train import checkpoint as ckpt
from tests.conftest import run_cmd, torchrun
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import assert_same, checkpoint, part

CD = "stage=consistency stage_args.solver=heun stage_args.steps=10 run.steps=6"  # target_ema 0.95: a target network
CT = ("stage=consistency stage_args.grid=karras stage_args.steps=10 stage_args.steps_max=40 stage_args.target_ema=0 "
      "stage_args.loss=pseudo_huber stage_args.weight=inverse_step stage_args.t_sampling=lognormal "
      "stage_args.boundary=edm stage_args.sample_steps=2 run.steps=6")
SAMPLE = [sys.executable, "-m", "difftrain", "sample"]
PP = "parallel.pp=2 parallel.pp_microbatches=2"


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """Three launches: one process (a teacher of 8 steps, its CD student, a CT student), 2 ranks of the CD student
    on FSDP2 killed on rank 1 at step 4 (a checkpoint at 3), then 2 ranks (the CD student on DDP and FSDP2, the CT
    student on FSDP2, and the killed run again, which resumes). Returns (dir, the kill's exit code, the newest
    checkpoint it left)."""
    out = tmp_path_factory.mktemp("consistency")
    base = f"{SMALL} data.train={digits['train']}"
    cd = f"{base} {CD} stage_args.teacher={out}/teacher@ema"
    cd_fsdp2 = f"{cd} parallel.engine=fsdp2 run.ckpt_every=3"
    ct = f"{base} {CT}"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "teacher", f"{base} run.steps=8 run.dir={out}/teacher",
                 "cd", f"{cd} run.dir={out}/cd_single",
                 "ct", f"{ct} run.dir={out}/ct_single"])
    killed = torchrun(2, ["-m", "difftrain", "train", *cd_fsdp2.split(), f"run.dir={out}/cd_killed"],
                      env={"DIFFTRAIN_FAULT": "kill_at_step:4:1"}, check=False)
    left = ckpt.latest_checkpoint(out / "cd_killed" / "checkpoints")
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "cd_ddp", f"{cd} run.dir={out}/cd_ddp",
                 "cd_fsdp2", f"{cd_fsdp2} run.dir={out}/cd_fsdp2",
                 "ct_fsdp2", f"{ct} parallel.engine=fsdp2 run.dir={out}/ct_fsdp2",
                 "cd_resumed", f"{cd_fsdp2} run.dir={out}/cd_killed",
                 # pipelined: the teacher's step as frozen work in the bubbles, the target's rows carried through
                 "cd_pp", f"{cd} {PP} run.dir={out}/cd_pp",
                 "cd_pp_fsdp2", f"{cd} {PP} parallel.engine=fsdp2 run.dir={out}/cd_pp_fsdp2",
                 "ct_pp", f"{ct} {PP} parallel.pp_frozen=balanced run.dir={out}/ct_pp",
                 # 3 steps pipelined, resumed plain (DDP) to 6: the target network's segments reshard by name
                 "cd_pp_then_plain_a", f"{cd} {PP} run.steps=3 run.dir={out}/cd_pp_then_plain",
                 "cd_pp_then_plain_b", f"{cd} run.dir={out}/cd_pp_then_plain"])
    return out, killed.returncode, left and left.name


def assert_close(ref: dict, got: dict, what: str, tol: float = 1e-5) -> None:
    assert ref and ref.keys() == got.keys(), what
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= tol, f"{what}: {k} differs by {diff}"


def images(out_dir) -> np.ndarray:
    return np.load(out_dir / "samples.npz")["images"]


def generator(run_dir, n: int):
    """The run's served model loaded in this process, and ``generate``'s other arguments as ``difftrain sample
    RUN --num n`` passes them (default labels, the run's guidance, seed 0)."""
    from difftrain.eval.generator import load_generator
    from difftrain.sampling import default_conditions, sample_shape

    torch.set_num_threads(1)
    g = load_generator(run_dir, torch.device("cpu"))
    _, labels = default_conditions(g.cond, n, [], g.cfg.model.num_classes)
    return g, dict(n=n, shape=sample_shape(g.acfg), guidance=g.sampling.guidance, seed=0, device=torch.device("cpu"),
                   labels=labels)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_cd_student_and_target_network_on_two_ranks_equal_one_process(runs, engine):
    out, _, _ = runs
    ref = load_file(str(out / "single" / "cd.safetensors"))
    got = load_file(str(out / "two" / f"cd_{engine}.safetensors"))
    teacher = load_file(str(out / "single" / "teacher.safetensors"))
    assert ref.keys() == got.keys() == teacher.keys()
    assert any(not torch.equal(ref[k], teacher[k]) for k in ref)  # the student trained away from its teacher
    assert_close(ref, got, f"{engine} student")
    (one, s1), (two, s2) = checkpoint(out / "cd_single"), checkpoint(out / f"cd_{engine}")
    assert s1["step"] == s2["step"] == 6 and s2["world_size"] == 2
    assert s1["modules"] == s2["modules"] == {"student": "trainable", "teacher": "frozen", "target": "derived"}
    target = part(one, "derived.target.")
    assert target.keys() == ref.keys()
    assert any(not torch.equal(target[k], ref[k]) for k in ref)  # it lags the student (mu = 0.95)
    assert_close(target, part(two, "derived.target."), f"{engine} target network")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["cd_pp", "cd_pp_fsdp2", "cd_pp_then_plain"])
def test_pipelined_cd_with_the_teacher_in_the_bubbles_equals_one_process(runs, run):
    """pp=2, 1F1B fill: the teacher's Heun step runs as frozen work (prefetched into the previous step's bubbles),
    the target network's segments (a derived module cut like the student) carry its rows through the pipeline; the
    student and the target network end where one process's do."""
    out, _, _ = runs
    (one, s1), (two, s2) = checkpoint(out / "cd_single"), checkpoint(out / run)
    assert s2["step"] == 6 and s1["modules"] == s2["modules"]
    for prefix in ("model.student.", "ema.student.", "derived.target."):
        assert_close(part(one, prefix), part(two, prefix), f"{run} {prefix}")
    assert any(not torch.equal(part(one, "derived.target.")[k], v) for k, v in part(one, "model.student.").items()
               if k in part(one, "derived.target."))


@pytest.mark.slow
def test_pipelined_ct_student_is_its_own_carried_target(runs):
    """pp=2 balanced, target_ema = 0: the student's own segments run the target's rows without gradient."""
    out, _, _ = runs
    (one, _), (two, s2) = checkpoint(out / "ct_single"), checkpoint(out / "ct_pp")
    assert s2["modules"] == {"student": "trainable"} and not any(k.startswith("derived.") for k in two)
    for prefix in ("model.student.", "ema.student."):
        assert_close(part(one, prefix), part(two, prefix), f"ct_pp {prefix}")


@pytest.mark.slow
def test_ct_student_on_two_fsdp2_ranks_equals_one_process(runs):
    out, _, _ = runs
    ref = load_file(str(out / "single" / "ct.safetensors"))
    got = load_file(str(out / "two" / "ct_fsdp2.safetensors"))
    assert_close(ref, got, "fsdp2 CT student")
    (one, s1), (two, s2) = checkpoint(out / "ct_single"), checkpoint(out / "ct_fsdp2")
    assert s1["modules"] == s2["modules"] == {"student": "trainable"}  # target_ema = 0: the student is its own target
    assert not any(k.startswith("derived.") for k in two)
    assert s1["sampling"]["sampler"] == "consistency_edm" and s1["sampling"]["steps"] == 2
    student, ema = part(one, "model.student."), part(one, "ema.student.")
    assert any(not torch.equal(student[k], ema[k]) for k in student)  # the student moved (its EMA lags)
    assert_close(ema, part(two, "ema.student."), "fsdp2 CT EMA")


@pytest.mark.slow
def test_cd_killed_mid_stage_resumes_bitwise(runs):
    out, rc, left = runs
    assert rc != 0 and left == "step_00000003"  # rank 1 died at step 4, after the checkpoint of step 3
    (ref, s1), (got, s2) = checkpoint(out / "cd_fsdp2"), checkpoint(out / "cd_killed")
    assert s1["step"] == s2["step"] == 6
    assert {k.split(".")[0] for k in ref} >= {"model", "optim", "ema", "derived"}
    assert any(k.startswith("optim.student.") and k.endswith("exp_avg_sq") for k in ref)
    # student, its EMA, the optimizer's moments and step, the target network: bitwise. Not rng.cpu: the trainer never
    # seeds the global generator (its noise is keyed), so its state depends on what ran before in the process
    assert_same(*({k: v for k, v in t.items() if not k.startswith("rng.")} for t in (ref, got)))
    assert_same(load_file(str(out / "two" / "cd_fsdp2.safetensors")),
                load_file(str(out / "two" / "cd_resumed.safetensors")))


@pytest.mark.slow
def test_sample_and_export_serve_the_cd_student_in_one_consistency_step(runs, tmp_path):
    out, _, _ = runs
    run_cmd([*SAMPLE, str(out / "cd_single"), "--num", "4", "--out", str(tmp_path / "s")])
    run_cmd([sys.executable, "-m", "difftrain", "export", str(out / "cd_single"), "--out", str(tmp_path / "e")])
    meta = json.loads((tmp_path / "e" / "difftrain.json").read_text())
    assert meta["stage"] == "consistency"
    assert meta["sampling"] == {"sampler": "consistency", "steps": 1, "guidance": meta["sampling"]["guidance"]}
    run_cmd([*SAMPLE, str(tmp_path / "e"), "--num", "4", "--out", str(tmp_path / "s2")])
    a, b = images(tmp_path / "s"), images(tmp_path / "s2")
    assert np.array_equal(a, b)  # the export samples as the run does: one consistency step, the same weights
    # what the run's default was: the consistency sampler in 1 step (not 2, which re-noises and refines)
    g, kw = generator(out / "cd_single", 4)
    one = generate(g.model, g.diffusion, g.conditioner, g.vae, steps=1, sampler="consistency", **kw)
    two = generate(g.model, g.diffusion, g.conditioner, g.vae, steps=2, sampler="consistency", **kw)
    assert np.array_equal(a, one) and not np.array_equal(a, two)


@pytest.mark.slow
def test_ct_two_step_samples_are_keyed_per_image(runs, tmp_path):
    """The 2-step consistency_edm sampler draws fresh noise at its second step, keyed by image: two calls give the
    same images, and image i is the same whether 4 or 8 are drawn (or drawn in this process)."""
    out, _, _ = runs
    for name, num in (("a", 8), ("b", 4)):
        run_cmd([*SAMPLE, str(out / "ct_single"), "--num", str(num), "--out", str(tmp_path / name)])
    a, b = images(tmp_path / "a"), images(tmp_path / "b")
    assert a.shape[0] == 8 and b.shape[0] == 4
    assert np.array_equal(a[:4], b)
    assert len({im.tobytes() for im in a}) == 8  # distinct images: the noise is per image, not one for all
    g, kw = generator(out / "ct_single", 8)
    assert (g.sampling.sampler, g.sampling.steps) == ("consistency_edm", 2)
    again = generate(g.model, g.diffusion, g.conditioner, g.vae, steps=2, sampler="consistency_edm", **kw)
    one = generate(g.model, g.diffusion, g.conditioner, g.vae, steps=1, sampler="consistency_edm", **kw)
    assert np.array_equal(a, again) and not np.array_equal(a, one)  # its default: 2 steps, re-noised in between
