"""Tier 2: checkpoints under real torchrun/gloo processes.

- 20 steps straight == 10 steps + SIGKILL of one rank + resume (bitwise on CPU, same data order)
- a rank SIGKILLed in the middle of writing a checkpoint leaves the previous one complete and loadable
- a checkpoint from 2 FSDP2 ranks resumes on 1 DDP process (resharding)
- SIGTERM (pre-emption) saves a checkpoint and exits cleanly
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from difftrain.models import registry
from difftrain.train.build import read_model_config
from difftrain.train.sources import load_run_weights
from difftrain.train import checkpoint as ckpt
from difftrain.train.checkpoint import MARKER, latest_checkpoint, read_train_state
from tests.conftest import REPO, torchrun

COMMON = ("configs/demo.yaml run.steps=20 run.ckpt_every=10 run.keep_last=3 run.log_every=1 run.progress=false "
          "run.sample_every=0 model.name=DiT-T/2 model.cond=class model.num_classes=10 model.args.depth=2 "
          "model.args.hidden_size=64 model.args.num_heads=4 data.batch_size=8 data.num_workers=1 data.shuffle_buffer=16 "
          "optim.schedule=constant optim.warmup_steps=3 optim.lr=1e-3 encoders.text= eval.every=0").split()


def train(nproc, run_dir, digits, *extra, env=None, check=True):
    args = ["-m", "difftrain", "train", *COMMON, f"data.train={digits['train']}", f"run.dir={run_dir}", *extra]
    return torchrun(nproc, args, env=env, check=check)


def weights(run_dir, which):
    arch, acfg = read_model_config(run_dir)
    m = registry.materialize(registry.build(arch, acfg), "cpu", seed=1)
    step = load_run_weights(run_dir, m, which=which)
    return step, {k: v.clone() for k, v in m.state_dict().items()}


def checkpoint(run_dir, step: int | None = None) -> tuple[dict, dict]:
    """Every tensor of a run's checkpoint of ``step`` (default: the newest) under its flat key (``model.NAME.*``,
    ``optim.NAME.*``, ``ema.NAME.*``, ``derived.NAME.*``, ``rng.*``), and its train state."""
    root = run_dir / "checkpoints"
    d = ckpt.latest_checkpoint(root) if step is None else ckpt.step_dir(root, step)
    md = ckpt.read_metadata(d / ".metadata")
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    ckpt.load_tensors(d, tensors)
    return tensors, ckpt.read_train_state(d)


def part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def assert_same_weights(run_a, run_b, step: int, tol=0.0):
    """Both runs' last checkpoints are of ``step`` and hold the same model and EMA weights."""
    for which in ("model", "ema"):
        s1, w1 = weights(run_a, which)
        s2, w2 = weights(run_b, which)
        assert s1 == s2 == step
        assert_same(w1, w2, tol)


def assert_same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if tol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"
        else:
            assert torch.allclose(a[k], b[k], atol=tol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "straight"
    train(2, d, digits)
    return d


def test_kill_one_rank_then_resume_is_bitwise_identical(straight, digits, tmp_path):
    d = tmp_path / "killed"
    p = train(2, d, digits, env={"DIFFTRAIN_FAULT": "kill_at_step:12:1"}, check=False)
    assert p.returncode != 0
    assert latest_checkpoint(d / "checkpoints").name == "step_00000010"
    train(2, d, digits)
    assert_same_weights(straight, d, 20)


def test_kill_mid_save_keeps_previous_checkpoint(straight, digits, tmp_path):
    d = tmp_path / "midsave"
    p = train(2, d, digits, env={"DIFFTRAIN_FAULT": "kill_in_save:20:1"}, check=False)
    assert p.returncode != 0
    partial = d / "checkpoints" / "step_00000020"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / MARKER).exists()
    assert latest_checkpoint(d / "checkpoints").name == "step_00000010"
    step, _ = weights(d, "ema")  # the previous checkpoint loads
    assert step == 10
    train(2, d, digits)  # resumes from 10 and finishes like the straight run
    assert_same(weights(straight, "model")[1], weights(d, "model")[1])


def test_a_checkpoint_from_before_named_modules_resumes_bitwise(straight, digits, tmp_path):
    """Checkpoints written before stages owned their modules hold one module under flat keys (``model.FQN``,
    ``optim.FQN.*``, ``ema.FQN``) and no ``served`` in their train state: the straight run's step-10 checkpoint
    rewritten that way resumes, and ends bitwise as the straight run."""
    import json
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from difftrain.train import checkpoint as ckpt

    d = tmp_path / "old"
    shutil.copytree(straight, d)
    shutil.rmtree(d / "checkpoints" / "step_00000020")
    (d / "checkpoints" / "latest").write_text("step_00000010")
    c = d / "checkpoints" / "step_00000010"
    md = ckpt.read_metadata(c / ".metadata")
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    ckpt.load_tensors(c, state)
    flat = {re.sub(r"^(model|optim|ema)\.backbone\.", r"\1.", k): v for k, v in state.items()}
    assert len(flat) == len(state) and any(k.startswith("model.blocks.") for k in flat)
    for f in [*c.glob("*.distcp"), c / ".metadata"]:
        f.unlink()
    dcp.save(flat, storage_writer=FileSystemWriter(c), no_dist=True)
    train_state = json.loads((c / "train_state.json").read_text())
    for key in ("stage", "served", "modules", "frozen", "sampling"):
        train_state.pop(key)
    (c / "train_state.json").write_text(json.dumps(train_state))
    train(2, d, digits)
    assert_same_weights(straight, d, 20)


def test_two_fsdp2_ranks_resume_on_one_process(straight, digits, tmp_path):
    d = tmp_path / "reshard"
    train(2, d, digits, "run.steps=10", "parallel.engine=fsdp2")
    assert read_train_state(latest_checkpoint(d / "checkpoints"))["world_size"] == 2
    train(1, d, digits)  # 1 process, DDP engine, continues to step 20
    s, w = weights(d, "model")
    assert s == 20
    assert_same(weights(straight, "model")[1], w, tol=1e-5)
    assert_same(weights(straight, "ema")[1], weights(d, "ema")[1], tol=1e-5)


def test_sigterm_saves_and_exits(digits, tmp_path):
    d = tmp_path / "preempt"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "difftrain",
            "train", *COMMON, f"data.train={digits['train']}", f"run.dir={d}", "run.steps=100000",
            "run.ckpt_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (d / "checkpoints" / "step_00000003" / MARKER).exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    saved = re.search(r"SIGTERM: saved step (\d+)", out)
    assert saved, out[-3000:]
    step = int(saved.group(1))
    assert step >= 3 and (d / "checkpoints" / f"step_{step:08d}" / MARKER).is_file()
    assert latest_checkpoint(d / "checkpoints").name == f"step_{step:08d}"
