"""Config guards through the real CLI (docs/RELIABILITY.md): a resume that changes what is trained is refused in one
line naming the keys with their old and new values, unless run.allow_config_change; budget and execution changes
continue and are logged; config.yaml is kept and each resume's config is written beside it; a batch size that the
world size does not divide ends a torchrun job in seconds, before any process group."""
import json
import sys
import time

import pytest
import torch
import yaml

from difftrain.eval.generator import load_run
from difftrain.train.checkpoint import latest_checkpoint, read_train_state
from tests.conftest import run_cmd, torchrun
from tests.distributed.test_resume import COMMON

pytestmark = pytest.mark.slow
SHORT = ("run.steps=4", "run.ckpt_every=2", "run.log_every=2")


def train(run_dir, digits, *extra):
    """One process (no launcher): stdout and stderr apart, so difftrain's last stderr line is its own."""
    return run_cmd([sys.executable, "-m", "difftrain", "train", *COMMON, f"data.train={digits['train']}",
                    f"run.dir={run_dir}", *SHORT, *extra], check=False, timeout=300)


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def test_resume_refuses_identity_changes_and_logs_the_others(digits, tmp_path):
    d = tmp_path / "run"
    p = train(d, digits)
    assert p.returncode == 0, p.stderr[-3000:]
    first = (d / "config.yaml").read_bytes()
    ckpts = d / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_00000004"

    # the case: the objective changed under a resume
    p = train(d, digits, "run.steps=6", "diffusion.target=eps", "optim.lr=0.05")
    assert p.returncode == 2, p.stderr[-3000:]
    assert lines(p.stderr)[-1] == (
        f"difftrain: error: resume of step 4 from '{ckpts}' refused: the config changes what is trained: "
        "diffusion.target 'velocity' -> 'eps' (resume with the checkpoint's values, start a new run.dir, or set "
        "run.allow_config_change=true)")
    assert "Traceback" not in p.stderr
    assert latest_checkpoint(ckpts).name == "step_00000004" and not list(d.glob("config.resume-*"))

    # budget and execution changes continue, each logged; they take effect (the LR of the final log line)
    p = train(d, digits, "run.steps=6", "optim.lr=0.05", "run.log_every=3")
    assert p.returncode == 0, p.stderr[-3000:]
    out = lines(p.stdout)
    assert [ln for ln in out if ln.startswith("resume: ")] == [
        "resume: budget change run.steps 4 -> 6", "resume: execution change run.log_every 2 -> 3",
        "resume: budget change optim.lr 0.001 -> 0.05"], p.stdout[-3000:]
    assert "lr=0.05" in out[-1].split()
    assert (d / "config.yaml").read_bytes() == first  # the first run's config, untouched
    resumed = yaml.safe_load((d / "config.resume-4.yaml").read_text())
    assert resumed["optim"]["lr"] == 0.05 and resumed["run"]["steps"] == 6
    state = read_train_state(latest_checkpoint(ckpts))
    assert state["step"] == 6 and state["config"]["optim"]["lr"] == 0.05

    # an identity change with run.allow_config_change=true continues and says so
    p = train(d, digits, "run.steps=8", "optim.lr=0.05", "diffusion.target=eps", "run.allow_config_change=true")
    assert p.returncode == 0, p.stderr[-3000:]
    out = lines(p.stdout)
    assert "resume: identity change diffusion.target 'velocity' -> 'eps' (allowed by run.allow_config_change)" in out
    assert "resume: execution change run.allow_config_change False -> True" in out
    assert (d / "config.yaml").read_bytes() == first
    assert yaml.safe_load((d / "config.resume-6.yaml").read_text())["diffusion"]["target"] == "eps"
    assert read_train_state(latest_checkpoint(ckpts))["config"]["diffusion"]["target"] == "eps"
    # sample / eval / export use the config the checkpoint was trained with, not the first run's config.yaml
    assert load_run(d, torch.device("cpu")).cfg.diffusion.target == "eps"

    # a checkpoint from before configs were saved in it: the hash differs, a warning, and the run continues
    f = latest_checkpoint(ckpts) / "train_state.json"
    old = json.loads(f.read_text())
    del old["config"]
    f.write_text(json.dumps(old))
    p = train(d, digits, "run.steps=10", "optim.lr=0.05", "diffusion.target=eps", "run.allow_config_change=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in lines(p.stderr) if ln.startswith("difftrain: warning: resuming step 8, saved with config "
                                                          f"hash {old['config_hash']}, with config hash ")], p.stderr
    assert sorted(x.name for x in d.glob("config*.yaml")) == [
        "config.resume-4.yaml", "config.resume-6.yaml", "config.resume-8.yaml", "config.yaml"]


def test_batch_size_against_the_world_size_fails_before_any_process_group(digits, tmp_path):
    d = tmp_path / "run"
    t0 = time.monotonic()
    p = torchrun(2, ["-m", "difftrain", "train", *COMMON, f"data.train={digits['train']}", f"run.dir={d}",
                     "data.batch_size=7"], check=False, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode != 0
    ours = [ln for ln in lines(p.stderr) if ln.startswith("difftrain: ")]
    assert ours and ours[-1] == ("difftrain: error: config key 'data.batch_size' = 7 must be a multiple of the "
                                 "data-parallel size 2 (world size 2) x optim.grad_accum 1"), p.stderr[-3000:]
    assert len(ours) == 2  # each rank says it once, nothing else
    assert not d.exists()  # no Trainer started: it would have written the run dir
    assert took < 45, took  # torchrun and two interpreters importing torch on a shared CPU; a process group is not
