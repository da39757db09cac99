"""Real training jobs for the chaos tests: torchrun (or one process) in its own process group, watched from outside."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.distributed.test_resume import COMMON

# the DeepSpeed engine's chaos cases: ZeRO-3 with every parameter partitioned (none kept whole on every rank)
ZERO3 = ("parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.zero_persistence_threshold=0")


class Job:
    """``difftrain train`` on the small test config, started at once; ``torchrun`` with ``nproc`` > 0 ranks."""

    def __init__(self, run_dir: Path, digits: dict, *overrides: str, nproc: int = 2, env: dict | None = None,
                 launcher: tuple[str, ...] = (), log: str = ""):
        self.run_dir = Path(run_dir)
        train = ["-m", "difftrain", "train", *COMMON, f"data.train={digits['train']}", f"run.dir={run_dir}",
                 *overrides]
        if nproc:
            args = [sys.executable, "-m", "torch.distributed.run", *(launcher or ("--standalone",)),
                    f"--nproc_per_node={nproc}", "--monitor_interval=0.5", *train]
        else:
            args = [sys.executable, *train]
        e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
        self.log = open(self.run_dir.parent / f"{log or self.run_dir.name}.log", "w+")
        self.proc = subprocess.Popen(args, cwd=REPO, env=e, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.t0 = time.monotonic()
        self.seen: set[int] = set()

    def wait_for(self, cond, what: str, timeout: float = 240) -> None:
        while not cond():
            self.descendants()
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc {self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() - self.t0 > timeout:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def trained(self, n: int) -> bool:
        """Rank 0 has finished step ``n`` (needs run.trace_samples=true)."""
        f = self.run_dir / "trace" / "rank_00000.jsonl"
        return f.is_file() and any(json.loads(ln)["step"] >= n for ln in f.read_text().splitlines() if ln.strip())

    def signal(self, sig=signal.SIGTERM, group: bool = False) -> float:
        """Send ``sig`` to the launcher (``group``: to its whole process group, as a batch scheduler does)."""
        self.descendants()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        return time.monotonic()

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job still running {timeout} s later:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        self.kill_all()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def messages(self) -> list[str]:
        """difftrain's own one-line messages, in order (torchrun's report is around them)."""
        return [ln.strip() for ln in self.output().splitlines() if ln.strip().startswith("difftrain: ")]

    def descendants(self) -> set[int]:
        """The launcher's processes now: itself, its ranks (torchrun starts each in a session of its own) and their
        loader workers; remembered, so that :meth:`leftovers` finds them after their parents are gone."""
        parent = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    pass
        out, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.add(pid)
            todo += [c for c, pp in parent.items() if pp == pid and c not in out]
        self.seen |= out
        return out

    def leftovers(self) -> list[int]:
        """Processes of this job (ever seen by :meth:`descendants`) still alive: none may outlive the job."""
        alive = []
        for pid in self.seen:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return alive

    def kill_all(self) -> None:
        """SIGKILL the launcher and every process it started (a node lost at once)."""
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def trace(run_dir: Path, rank: int = 0) -> dict[int, list[str]]:
    """The keys each step trained on, as finally kept (a step re-run after a restart replaces the earlier record)."""
    out = {}
    for ln in (Path(run_dir) / "trace" / f"rank_{rank:05d}.jsonl").read_text().splitlines():
        if ln.strip():
            rec = json.loads(ln)
            out[rec["step"]] = rec["keys"]
    return out
