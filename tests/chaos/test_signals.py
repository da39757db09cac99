"""SIGTERM / SIGINT at any moment (startup, the first steps, sampling, a save in progress) ends a 2-rank torchrun job
with a complete checkpoint of the last finished step, well inside torchrun's 30 s grace, every rank agreeing
without waiting for a log step (log_every is larger than the run); in the first steps also under the DeepSpeed
engine (ZeRO-3, whose save gathers the partitions)."""
import re
import signal
import time

import pytest

from difftrain.train.checkpoint import MARKER, complete_checkpoints
from tests.chaos.jobs import ZERO3, Job

pytestmark = pytest.mark.slow
LONG = ("run.steps=100000", "run.log_every=100000", "run.ckpt_every=0", "run.trace_samples=true")


def stopped_step(job: Job, sig: str) -> int:
    last = job.messages()[-1]
    m = re.fullmatch(rf"difftrain: stopped by {sig}: saved step (\d+) \((.+)\)", last)
    assert m, job.output()[-3000:]
    step = int(m.group(1))
    done = complete_checkpoints(job.run_dir / "checkpoints")
    assert done and done[-1][0] == step and (done[-1][1] / MARKER).is_file()
    return step


def test_sigterm_during_startup_ends_at_once(digits, tmp_path):
    job = Job(tmp_path / "startup", digits, *LONG)
    job.wait_for(lambda: (job.run_dir / "config.yaml").is_file(), "startup")
    sent = job.signal(signal.SIGTERM, group=True)
    rc = job.wait(60)
    assert time.monotonic() - sent < 20
    assert rc != 0
    assert any("during startup" in m or "stopped by SIGTERM" in m for m in job.messages()), job.output()[-3000:]
    assert not job.leftovers()


@pytest.mark.parametrize("engine", [(), ZERO3], ids=["ddp", "deepspeed_zero3"])
def test_sigterm_in_the_first_steps_saves_the_last_step(digits, tmp_path, engine):
    job = Job(tmp_path / "first", digits, *LONG, *engine)
    job.wait_for(lambda: job.trained(1), "step 1")
    sent = job.signal(signal.SIGTERM)  # the agent forwards it to the ranks
    job.wait(60)
    assert time.monotonic() - sent < 20
    step = stopped_step(job, "SIGTERM")
    assert 1 <= step <= 6
    assert not job.leftovers()


def test_sigint_during_sampling_stops_every_rank_at_the_same_call(digits, tmp_path):
    # sampling 16 images with 400 steps after step 2 takes far longer than a step: the signal lands in it
    job = Job(tmp_path / "sampling", digits, *LONG, "run.sample_every=2", "run.sample_steps=400",
              "run.sample_sampler=euler")
    job.wait_for(lambda: job.trained(2), "step 2")
    time.sleep(0.5)
    sent = job.signal(signal.SIGINT, group=True)
    job.wait(60)
    assert time.monotonic() - sent < 20
    assert stopped_step(job, "SIGINT") == 2
    assert not (job.run_dir / "samples" / "step_00000002.png").exists()  # the grid was cut short, on both ranks


def test_sigterm_during_a_save_finishes_it(digits, tmp_path):
    job = Job(tmp_path / "save", digits, *LONG[:2], "run.ckpt_every=3", "run.trace_samples=true",
              env={"DIFFTRAIN_FAULT": "slow_in_save:3:1"})  # rank 1 spends 4 s in the save of step 3
    job.wait_for(lambda: job.trained(3), "step 3")
    sent = job.signal(signal.SIGTERM, group=True)
    job.wait(60)
    assert time.monotonic() - sent < 20
    assert 3 <= stopped_step(job, "SIGTERM") <= 6
    assert complete_checkpoints(job.run_dir / "checkpoints")[0][0] == 3
