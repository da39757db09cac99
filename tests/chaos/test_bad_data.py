"""Bad data never hangs a job: a missing shard is refused before training in one line; mostly broken data (every
sample undecodable, every shard random bytes) ends the job from inside the loader worker, in one line naming the
source and the reasons, on every rank; a loader worker that dies ends the job in one line naming the rank; and no
process is left behind. Real tars, real DataLoader workers, the real CLI under torchrun (the slow ones)."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difftrain.config import ConfigError
from difftrain.data.loader import MIN_SEEN, MIN_SHARDS, DataError, ShardLoader
from difftrain.data.spec import check_local
from difftrain.errors import DifftrainError
from difftrain.train.trainer import LookAhead
from tests.chaos.jobs import Job
from tests.conftest import REPO
from tests.unit.test_data import good, write_tar


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def children() -> list[int]:
    """This process's live children (loader workers)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[1] == str(os.getpid()) and fields[0] != "Z":
                out.append(int(p.name))
    return out


def gone(pids, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(_state(p) in (None, "Z") for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """Specs of 4 shards each: ``random`` (random bytes), ``undecodable`` (valid tars, 40 samples each whose .jpg
    is garbage), ``good`` (8 valid shards), ``mixed`` (one source of 24 shards: 16 random, 8 good)."""
    d = tmp_path_factory.mktemp("bad_data")
    rng = random.Random(0)
    for i in range(24):
        (d / f"random_{i:05d}.tar").write_bytes(rng.randbytes(20_000))
    for i in range(4):
        write_tar(d / f"undecodable_{i:05d}.tar",
                  [{"__key__": f"{i:04d}{j:05d}", "jpg": b"\xff\xd8\xff not a jpeg", "txt": b"a digit",
                    "cls": str(j % 10).encode()} for j in range(40)])
    for i in range(8):
        write_tar(d / f"good_{i:05d}.tar", [good(100 * i + j) for j in range(12)])
    return {"random": f"{d}/random_{{00000..00003}}.tar", "undecodable": f"{d}/undecodable_{{00000..00003}}.tar",
            "good": f"{d}/good_{{00000..00007}}.tar", "dir": d,
            "mixed": [{"shards": [f"{d}/random_{{00000..00015}}.tar", f"{d}/good_{{00000..00007}}.tar"]}]}


def loader(spec, num_workers=0, **kw):
    kw.setdefault("channels", 1)
    kw.setdefault("image_size", 16)
    return ShardLoader(spec, 4, num_workers=num_workers, groups=max(1, num_workers), **kw)


# ------------------------------------------------------------------------------- fast: in this process
def test_missing_local_shards_are_refused_in_one_line(bad, tmp_path):
    d = bad["dir"]
    with pytest.raises(ConfigError, match=rf"^config key 'data.train': 2 of its 6 shards are missing "
                                          rf"\(first missing: {d}/good_00008.tar\)$"):
        check_local(f"{d}/good_{{00004..00009}}.tar")
    with pytest.raises(ConfigError, match=rf"^config key 'data.train\[1\].shards': none of its 3 shard\(s\) exist "
                                          rf"\(first missing: {tmp_path}/nope/0.tar\)$"):
        check_local([bad["good"], {"shards": f"{tmp_path}/nope/{{0..2}}.tar", "weight": 1}])
    with pytest.raises(ConfigError, match=r"^config key 'eval.ref': none of its 1 shard"):
        check_local(str(tmp_path), "eval.ref")  # a directory is not a shard
    with pytest.raises(ConfigError, match=r"file:/no/such.tar"):  # file: URLs are local paths
        check_local("file:/no/such.tar")
    check_local(f"file:{d}/good_00000.tar")
    check_local(["pipe:cat /no/such.tar", "https://example.invalid/{0..9}.tar"])  # only reading can check these
    with pytest.raises(ConfigError, match=r"data.train.*good_00008.tar"):  # ShardLoader refuses it too
        loader(f"{d}/good_{{00000..00008}}.tar")


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("kind", ["undecodable", "random"])
def test_all_broken_data_stops_in_the_worker_before_any_batch(bad, kind, num_workers):
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        next(iter(loader(bad[kind], num_workers)))
    msg = str(e.value)
    assert isinstance(e.value, DifftrainError) and "\n" not in msg and len(msg) <= 600
    where = "rank 0" + (" (loader worker 0)" if num_workers else "")
    if kind == "undecodable":  # the sample rule, in the worker: no batch was ever made
        assert re.match(rf"data.max_skip_rate=0.5 exceeded on {re.escape(where)}: {MIN_SEEN} of {MIN_SEEN} samples "
                        rf"read were broken \(decode_error={MIN_SEEN}\) in data.train={re.escape(bad[kind])}; last: "
                        r"undecodable image in sample \d+ of \S+/undecodable_\d+.tar", msg), msg
    else:  # every shard of the source failed in a row
        assert re.match(rf"data.train on {re.escape(where)}: all 4 shards of data source 0 failed in a row; last: "
                        r"shard \S+/random_0000\d.tar is truncated or corrupt .* \(skipped so far: shard_truncated=5\)$",
                        msg), msg
    assert time.monotonic() - t0 < 30
    assert gone(children(), 5), "loader workers left running"


def test_mostly_failing_shards_stop_the_run(bad):
    """16 of 24 shards of a source random bytes, good ones between them (never all in a row): the shard rule."""
    with pytest.raises(DataError, match=r"data.max_skip_rate=0.5 exceeded on rank 0 \(loader worker 0\): (\d+) of "
                                        r"(\d+) shards opened failed \(shard_truncated=\d+"):
        for _ in loader(bad["mixed"], 1, streams=1):
            pass
    with pytest.raises(DataError) as e:
        for _ in loader(bad["mixed"], 0, streams=1):
            pass
    n, m = map(int, re.search(r"(\d+) of (\d+) shards opened failed", str(e.value)).groups())
    assert m >= MIN_SHARDS and n > 0.5 * m
    assert not children()


def test_a_killed_worker_is_one_line_naming_the_rank(bad):
    for where in ("loader", "compute"):
        it = iter(loader(bad["good"], 2, channels=1))
        next(it)
        workers = children()
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DataError, match=rf"^a data loader worker of rank 0 died reading data.train=\S+: "
                                            rf"DataLoader worker \(pid\(?s?\)? {workers[0]}\) (is killed by signal|"
                                            r"exited unexpectedly)"):
            if where == "loader":
                for _ in range(1000):
                    next(it)
            else:  # torch's SIGCHLD handler raises wherever the main thread is
                while time.monotonic() - t0 < 20:
                    sum(range(1000))
        assert time.monotonic() - t0 < 10
        it.close()
        assert gone(workers, 10), "loader workers left running"


def test_lookahead_leaves_nothing_running(bad):
    t0 = time.monotonic()
    with pytest.raises(DataError):
        LookAhead(loader(bad["random"], 2))  # the first batch fails: its workers are stopped before it raises
    assert gone(children(), 5) and time.monotonic() - t0 < 30
    data = LookAhead(loader(bad["good"], 2))
    next(data)
    workers = children()
    assert len(workers) == 2
    t0 = time.monotonic()
    data.close()
    data.close()
    assert gone(workers, 1) and time.monotonic() - t0 < 7  # prompt: each worker finishes at most its batch


# --------------------------------------------------------------------------- slow: real jobs, real processes
def finish(job: Job, timeout: float) -> tuple[int, float]:
    """Wait for the job, watching its processes; (exit code, seconds since the start)."""
    end = time.monotonic() + timeout
    while job.proc.poll() is None and time.monotonic() < end:
        job.descendants()
        time.sleep(0.05)
    return job.wait(1), time.monotonic() - job.t0


def error_line(job: Job) -> str:
    ours = [m for m in job.messages() if m.startswith("difftrain: error: ")]
    assert ours, job.output()[-4000:]
    return ours[-1]


@pytest.mark.slow
def test_a_missing_shard_is_fatal_before_training(bad, tmp_path):
    d = bad["dir"]
    job = Job(tmp_path / "run", {"train": f"{d}/good_{{00000..00009}}.tar"}, nproc=0)
    rc, took = finish(job, 120)
    assert rc == 2 and took < 60, (rc, took, job.output()[-3000:])
    assert job.output().strip().splitlines()[-1] == (
        f"difftrain: error: config key 'data.train': 2 of its 10 shards are missing (first missing: "
        f"{d}/good_00008.tar)")
    assert not (tmp_path / "run" / "checkpoints").exists() and not job.leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("kind,num_workers", [("random", 1), ("random", 0), ("undecodable", 1)])
def test_broken_data_ends_every_rank_in_one_line(bad, tmp_path, kind, num_workers):
    job = Job(tmp_path / "run", {"train": bad[kind]}, f"data.num_workers={num_workers}", "data.shuffle_buffer=0")
    rc, took = finish(job, 240)
    assert rc != 0 and took < 120, (rc, took, job.output()[-3000:])
    line = error_line(job)
    if kind == "random":
        assert re.fullmatch(r"difftrain: error: data.train on rank [01]( \(loader worker 0\))?: all 4 shards of "
                            r"data source 0 failed in a row; last: shard \S+random_0000\d.tar is truncated or "
                            r"corrupt .*", line), line
    else:
        assert re.fullmatch(rf"difftrain: error: data.max_skip_rate=0.5 exceeded on rank [01] \(loader worker 0\): "
                            rf"{MIN_SEEN} of {MIN_SEEN} samples read were broken \(decode_error={MIN_SEEN}\) in "
                            r"data.train=\S+; last: undecodable image .*", line), line
    assert gone(job.seen, 10) and not job.leftovers()


@pytest.mark.slow
def test_a_killed_loader_worker_ends_the_job(digits, tmp_path):
    job = Job(tmp_path / "run", digits, "run.steps=400", "run.trace_samples=true", "run.log_every=100",
              "run.ckpt_every=0")
    job.wait_for(lambda: job.trained(2), "step 2")
    ranks = {pid for pid in job.descendants() if _parent(pid) == job.proc.pid}
    workers = [pid for pid in job.descendants() if _parent(pid) in ranks and b"RANK=1\0" in _environ(pid)]
    assert len(workers) == 1, (ranks, job.descendants())
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    rc, _ = finish(job, 120)
    assert rc != 0 and time.monotonic() - killed < 45, job.output()[-3000:]
    assert re.fullmatch(rf"difftrain: error: a data loader worker of rank 1 died reading data.train=\S+: DataLoader "
                        rf"worker \(pid\(?s?\)? {workers[0]}\) .*", error_line(job)), job.output()[-3000:]
    assert gone(job.seen, 10) and not job.leftovers()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def _environ(pid: int) -> bytes:
    try:
        return b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


SCRIPT = """
import os, sys, time
from difftrain.data.loader import ShardLoader
from tests.chaos.test_bad_data import children
it = iter(ShardLoader(sys.argv[1], 4, num_workers=2, groups=2, channels=1, image_size=16))
next(it)
print(" ".join(map(str, children())), flush=True)
if sys.argv[2] == "raise":
    raise ValueError("the trainer's own error, the loader left open")
time.sleep(300)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_workers_exit_with_the_process(bad, how):
    """An exception that ends the program with a loader open (workers ignore SIGTERM, which is how multiprocessing
    stops daemon processes at exit) exits at once; a main process killed outright takes its workers along."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, bad["good"], how], cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = [int(x) for x in p.stdout.readline().split()]
    assert len(workers) == 2
    t0 = time.monotonic()
    if how == "sigkill":
        p.kill()
    try:
        rc = p.wait(timeout=30)
    finally:
        p.kill()
    assert rc == (1 if how == "raise" else -signal.SIGKILL) and time.monotonic() - t0 < 15
    if how == "raise":
        assert p.stderr.read().strip().splitlines()[-1] == "ValueError: the trainer's own error, the loader left open"
    assert gone(workers, 5), "loader workers outlived their process"
