"""A job restarts by itself: under ``torchrun --max-restarts`` a rank SIGKILLed mid-step brings the job back from the
newest complete checkpoint through torchrun's elastic agent, and the final weights and the order of samples equal an
uninterrupted run's bit for bit (under the DeepSpeed engine's ZeRO-3: the weights within fp32 tolerance); with ``--nnodes 1:2``, losing one of two agents (a node: the agent and its ranks)
continues on the other with every remaining sample of the epoch exactly once."""
import pytest

from difftrain.train.checkpoint import complete_checkpoints
from tests.chaos.jobs import ZERO3, Job, trace
from tests.distributed.test_resume import assert_same_weights

pytestmark = pytest.mark.slow
TRACE = "run.trace_samples=true"


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory):
    job = Job(tmp_path_factory.mktemp("restart") / "straight", digits, TRACE)
    assert job.wait(300) == 0, job.output()[-3000:]
    return job


# the agent's store shared with the ranks (torchrun's default: each attempt rendezvouses under a prefix of its own),
# or a fresh store per attempt hosted by rank 0
# and the DeepSpeed engine (ZeRO-3), whose weights equal the uninterrupted DDP run's within fp32 tolerance
@pytest.mark.parametrize("share, engine", [("0", ()), ("1", ()), ("0", ZERO3)], ids=["0", "1", "0-deepspeed_zero3"])
def test_a_killed_rank_restarts_and_finishes_like_an_uninterrupted_run(straight, digits, tmp_path, share, engine):
    job = Job(tmp_path / "restarted", digits, TRACE, *engine, launcher=("--standalone", "--max-restarts=1"),
              env={"DIFFTRAIN_FAULT": "kill_at_step:12:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": share})
    assert job.wait(300) == 0, job.output()[-3000:]
    out = job.output()
    assert "resumed from" in out and "step_00000010" in out  # through the agent's restart, from the newest checkpoint
    assert_same_weights(straight.run_dir, job.run_dir, 20, tol=1e-5 if engine else 0.0)
    for rank in (0, 1):
        assert trace(job.run_dir, rank) == trace(straight.run_dir, rank)
    assert not job.leftovers()


def test_losing_one_of_two_agents_continues_on_the_other(digits, tmp_path):
    run = tmp_path / "elastic"
    launcher = ("--nnodes=1:2", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:29731", f"--rdzv_id={tmp_path.name}",
                "--max-restarts=3")
    conf = "--rdzv_conf=last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3,is_host="  # A hosts the store
    args = (TRACE, "run.steps=40", "run.ckpt_every=5", "run.log_every=1000")
    a = Job(run, digits, *args, nproc=1, launcher=(*launcher, conf + "true"), log="agent_a")
    b = Job(run, digits, *args, nproc=1, launcher=(*launcher, conf + "false"), log="agent_b")
    a.wait_for(lambda: _last_step(run, 1) >= 12, "step 12 on two nodes")
    b.kill_all()  # node B is lost: its agent and its rank
    assert a.wait(400) == 0, a.output()[-4000:]
    assert "resumed from" in a.output()
    assert complete_checkpoints(run / "checkpoints")[-1][0] == 40
    straight = Job(tmp_path / "straight", digits, *args)  # the same job on 2 ranks, never interrupted
    assert straight.wait(300) == 0, straight.output()[-3000:]
    # each step's batch as finally trained: both ranks' halves before the loss, rank 0's whole batch after it
    t0, t1, s0, s1 = trace(run, 0), trace(run, 1), trace(straight.run_dir, 0), trace(straight.run_dir, 1)
    assert {len(t0[s]) for s in t0} == {4, 8}  # it did continue on one rank
    for s in range(1, 41):  # the same samples in the same order: none lost, none repeated
        assert (t0[s] if len(t0[s]) == 8 else t0[s] + t1[s]) == s0[s] + s1[s], s
    assert not a.leftovers() and not b.leftovers()


def _last_step(run, rank) -> int:
    try:
        return max(trace(run, rank), default=0)
    except FileNotFoundError:
        return 0
