"""A rank that stalls ends the job within run.timeout with one line naming the rank and the phase; a rank that works
alone while the others wait for it (scoring a validation, a slow save) never makes them time out."""
import re
import time

import pytest

from tests.chaos.jobs import Job

pytestmark = pytest.mark.slow
FAST = ("run.steps=12", "run.log_every=100", "run.ckpt_every=0", "run.timeout=4", "run.trace_samples=true")


@pytest.mark.parametrize("phase", ["data", "callbacks"])
def test_a_stalled_rank_ends_the_job_naming_it(digits, tmp_path, phase):
    # data: a loader that produces nothing; callbacks: rank 1 stuck by itself while rank 0 waits in the
    # next step's gradient all-reduce (a collective missing a peer)
    job = Job(tmp_path / phase, digits, *FAST, env={"DIFFTRAIN_FAULT": f"stall_in_{phase}:3:1"})
    job.wait_for(lambda: job.trained(3), "step 3")
    stalled = time.monotonic()
    rc = job.wait(90)
    took = time.monotonic() - stalled
    assert rc != 0
    assert re.fullmatch(rf"difftrain: error: rank 1 stalled in phase '{phase}' at step 3: no rank has made progress "
                        r"for \d+ s \(run.timeout=4; the other ranks' phases: 0: \w+\); ending the job", job.messages()[-1]), \
        job.output()[-3000:]
    assert took < 4 + 15, took  # the timeout, the watchdog's interval and torchrun's teardown
    assert not job.leftovers()


def test_work_alone_longer_than_the_timeout_is_not_a_stall(digits, tmp_path):
    # rank 0 works 4 s by itself in step 3's callbacks, then 4 s in step 6's save; run.timeout is 2 s
    job = Job(tmp_path / "alone", digits, *FAST[:3], "run.timeout=2", "run.ckpt_every=6",
              env={"DIFFTRAIN_FAULT": "slow_in_callbacks:3:0"})
    assert job.wait(120) == 0, job.output()[-3000:]
    assert not [m for m in job.messages() if "stalled" in m]
