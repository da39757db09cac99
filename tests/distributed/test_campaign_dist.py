"""Tier 2: ``difftrain campaign`` under torchrun with 2 ranks on the small class-conditional DiT of
tests/distributed/test_resume.py (a few steps per stage): teacher -> pairs -> reflow, teacher -> progressive 2 -> 1.

- a campaign with one rank SIGKILLed in the middle of its reflow stage, run again, skips its finished stages (their
  checkpoints and shards untouched), resumes the reflow stage and ends with every stage's final weights (and the
  pair shards' bytes) equal to an uninterrupted campaign's;
- a changed identity key of a finished stage is refused in one line, and so is its student until rerun too;
  ``--rerun`` trains them again (the old folders kept) and the evaluation writes a table, a JSON with a row per
  (stage, sampler, NFE) and the FID-vs-NFE plot.
"""
from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from difftrain.train.checkpoint import latest_checkpoint
from tests.conftest import run_cmd, torchrun
from tests.distributed.test_resume import COMMON, assert_same_weights

PD = ["diffusion.target=v", "diffusion.weighting=truncated_snr"]
STEPS = {"teacher": 4, "rf": 6, "pd2": 4, "pd1": 4}


def write_campaign(path, run_dir, digits, pd2=()):
    tree = {"dir": str(run_dir), "config": "configs/demo.yaml",
            "overrides": [*COMMON[1:], f"data.train={digits['train']}", "run.steps=4", "run.ckpt_every=2",
                          "optim.eps=1e-6"],
            "stages": {"teacher": {},
                       "pairs": {"kind": "pairs", "from": "teacher", "count": 16, "steps": 2, "batch": 8,
                                 "shard_size": 8},
                       "rf": {"stage": "reflow", "from": "pairs", "overrides": ["run.steps=6"]},
                       "pd2": {"stage": "progressive", "from": "teacher", "stage_args": {"steps": 2},
                               "overrides": [*PD, *pd2]},
                       "pd1": {"stage": "progressive", "from": "pd2", "stage_args": {"steps": 1}, "overrides": PD}},
            "eval": {"ref": digits["val"], "extractor": "digits", "samples": 16, "batch": 16, "nfe": [1, 2],
                     "teacher_samplers": ["euler", "heun"]}}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def campaign(nproc, file, *flags, **kw):
    args = ["-m", "difftrain", "campaign", str(file), *flags]
    if nproc:
        return torchrun(nproc, args, **kw)
    return run_cmd([sys.executable, *args], **kw)


def mtimes(run_dir):
    return {str(f): f.stat().st_mtime_ns for f in sorted(run_dir.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """An uninterrupted campaign, and one killed mid-reflow (rank 1, after its step 5) then run again."""
    out = tmp_path_factory.mktemp("campaign")
    straight = write_campaign(out / "straight.yaml", out / "straight", digits)
    campaign(2, straight, "--skip-eval")
    killed = write_campaign(out / "killed.yaml", out / "killed", digits)
    p = campaign(2, killed, "--skip-eval", env={"DIFFTRAIN_FAULT": "kill_at_step:5:1"}, check=False)
    assert p.returncode != 0
    d = out / "killed"
    assert latest_checkpoint(d / "rf" / "checkpoints").name == "step_00000004" and not (d / "pd2").exists()
    before = {n: mtimes(d / n) for n in ("teacher", "pairs")}
    again = campaign(2, killed, "--skip-eval")
    return out, before, again.stdout


@pytest.mark.slow
def test_a_killed_campaign_resumes_and_ends_as_an_uninterrupted_one(runs):
    out, before, log = runs
    a, b = out / "straight", out / "killed"
    assert re.search(r"teacher\s+pretrain\s+skip\s+finished \(step 4\)", log), log
    assert re.search(r"pairs\s+pairs\s+skip\s+2/2 shards \(finished\)", log), log
    assert re.search(r"rf\s+reflow\s+resume\s+interrupted at step 4 of 6", log), log
    assert "campaign: stage 'teacher' (" not in log and "campaign: stage 'pairs' (" not in log  # not run again
    for name in ("teacher", "pairs"):
        assert mtimes(b / name) == before[name], f"{name} was written again"
    for k in range(2):
        assert (a / "pairs" / f"{k:05d}.tar").read_bytes() == (b / "pairs" / f"{k:05d}.tar").read_bytes()
    for name, step in STEPS.items():
        assert_same_weights(a / name, b / name, step)


@pytest.mark.slow
def test_a_changed_stage_is_refused_until_rerun_then_evaluated(runs, digits):
    out, _, _ = runs
    b = out / "killed"
    changed = write_campaign(out / "changed.yaml", b, digits, pd2=["run.seed=1"])
    p = campaign(0, changed, "--skip-eval", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert err[0].startswith("difftrain: error: campaign stage 'pd2' has changed since it was trained (step 4): "
                             "run.seed 0 -> 1;") and "--rerun pd2" in err[0]
    p = campaign(0, changed, "--skip-eval", "--rerun", "pd2", check=False)  # its student is refused in turn
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "campaign stage 'pd1' has changed" in err[0], p.stderr
    assert "'pd2', which it comes from, trains again" in err[0] and (b / "pd2").is_dir()  # nothing moved yet

    p = campaign(0, changed, "--rerun", "pd2", "pd1")
    assert (b / "pd2.replaced-1").is_dir() and (b / "pd1.replaced-1").is_dir()
    assert_same_weights(b / "pd2.replaced-1", out / "straight" / "pd2", 4)  # the old run, kept
    with pytest.raises(AssertionError):
        assert_same_weights(b / "pd2", out / "straight" / "pd2", 4)  # trained again with its new seed

    rows = json.loads((b / "results.json").read_text())
    got = {(r["stage"], r["sampler"], r["nfe"]) for r in rows}
    assert got == {("teacher", "euler", 1), ("teacher", "euler", 2), ("teacher", "heun", 1), ("rf", "euler", 1),
                   ("rf", "euler", 2), ("pd2", "ddim", 2), ("pd1", "ddim", 1)}
    assert len(rows) == len(got) and all(r["fid"] > 0 and "class_acc" in r for r in rows)
    table = (b / "results.md").read_text()
    assert "| stage | kind | sampler | steps | NFE | FID | KID | precision | recall | class accuracy |" in table
    assert len([ln for ln in table.splitlines() if re.match(r"\| (teacher|rf|pd2|pd1) \|", ln)]) == len(rows)
    assert (b / "fid_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"
    p = campaign(0, changed)  # once more: every stage skipped, every evaluation read back from its chunks
    assert all(re.search(rf"{n}\s+\S+\s+skip", p.stdout) for n in ("teacher", "pairs", "rf", "pd2", "pd1"))
    assert " steps:" not in p.stderr  # no sampling progress bar: nothing sampled again
    assert json.loads((b / "results.json").read_text()) == rows
