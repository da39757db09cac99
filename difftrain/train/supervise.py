"""Keeping a job honest about time: stop on SIGTERM / SIGINT at any moment with every rank agreeing where, and
end a stalled job instead of hanging.

**Signals.** ``StopSignal`` is installed by ``difftrain train`` before anything else. Until the first step starts
(startup: rendezvous, building, loading, resuming) a signal raises :class:`Preempted` at once: no step has finished
since the newest checkpoint, so there is nothing to save. From then on it only records the signal, and the ranks
agree on it without waiting for a log step: at the start of every step each rank starts an asynchronous all-reduce
(MAX) of its flag on a gloo group of its own (host memory only: no device sync) and reads its result at the end of
the step, so every rank sees the same value after the same step and they stop together, at the end of the step
after the one the signal arrived in (or of that one, if it came between steps), and save it. Inside work between
steps that runs on every rank in lockstep (sample grids, validation) :func:`point` polls the flag with a blocking
all-reduce of the same group at each model call, so a signal there unwinds every rank at the same call (the EMA
swap is undone by its context manager) and the last finished step is saved. A save in progress finishes, then the
run stops.

**Stalls.** ``Watchdog`` is a thread on every rank. The main loop marks its phase (data, step, log, callbacks,
save) and long work between steps beats at each :func:`point`; the thread publishes a beat counter, phase and step
in the job's rendezvous store every few seconds. Global rank 0's thread reads every rank's; when *no* rank has
advanced for ``run.timeout`` seconds (the job runs in lockstep, so one stuck rank — a loader that produces nothing,
a collective missing a peer — soon stops every other), it names the rank that is behind the others (every rank
enters the same sequence of phases, so the fewest entered; on a tie, the one whose last beat is oldest by its own
wall clock; progress itself is judged on rank 0's clock alone) and its phase, writes that line into the store,
where every rank's thread finds it, and each process exits. A rank that works alone (rank 0 scoring a validation,
writing a checkpoint's marker) keeps beating, so the ranks waiting for it never time out (its thread beats for it
inside :func:`alone`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from difftrain.errors import DifftrainError, say

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_hooks: list = []
_alone = [0]  # depth of alone() sections on this rank


def point() -> None:
    """A place in long work between steps (a sampler's model call, a validation batch) where the run may be
    stopped by an agreed signal and where it shows it is alive. Does nothing outside a training run."""
    for h in list(_hooks):
        h()


@contextlib.contextmanager
def hooked(fn):
    _hooks.append(fn)
    try:
        yield
    finally:
        _hooks.remove(fn)


@contextlib.contextmanager
def alone():
    """Work this rank does by itself while the others wait for it (rank 0 scoring a validation, pruning
    checkpoints): the watchdog counts the rank as alive throughout, so the waiting ranks never time out."""
    _alone[0] += 1
    try:
        yield
    finally:
        _alone[0] -= 1


class Preempted(DifftrainError):
    """A signal ended the run; the exit code is 128 + the signal number, as a shell reports a killed process."""

    label = ""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignal:
    """SIGTERM / SIGINT handler: raises during startup, records afterwards (see the module docstring)."""

    def __init__(self):
        self.signum: int | None = None
        self.immediate = True
        self._prev: dict = {}

    def install(self) -> "StopSignal":
        for s in SIGNALS:
            self._prev[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, prev in self._prev.items():
            signal.signal(s, prev)
        self._prev.clear()

    def stopped(self, what: str) -> Preempted:
        """The error that ends the run after an agreed stop (a rank that got no signal itself reports SIGTERM)."""
        signum = self.signum or signal.SIGTERM
        return Preempted(signum, f"stopped by {signal.Signals(signum).name}: {what}")

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self.immediate:
            raise Preempted(signum, f"stopped by {signal.Signals(signum).name} during startup: no step trained since "
                                    "the newest checkpoint, nothing to save")


class StopAgreement:
    """Every rank's stop flag, all-reduced (MAX) on a gloo group of its own, asynchronously between steps."""

    def __init__(self, stop: StopSignal):
        self.stop = stop
        self.group = dist.new_group(backend="gloo")
        self._flag = np.zeros(1, dtype=np.int32)  # read through numpy: no tensor op, no dispatch
        self._tensor = torch.from_numpy(self._flag)
        self._work = None

    def _start(self) -> None:
        self._flag[0] = 1 if self.stop.signum is not None else 0
        self._work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def _result(self) -> bool:
        if self._work is None:
            return False
        self._work.wait()
        self._work = None
        return bool(self._flag[0])

    def start(self) -> None:
        """Start of a step: all-reduce the flag as it is now, while the step runs."""
        self._result()
        self._start()

    def result(self) -> bool:
        """End of the step: the agreed flag as of its start."""
        return self._result()

    def now(self) -> bool:
        """Blocking: has any rank been signalled (by now, or as of the pending all-reduce)?"""
        agreed = self._result()
        self._start()
        return self._result() or agreed

    def close(self) -> None:
        self._result()


class Watchdog:
    """Ends the job when no rank has advanced for ``timeout`` seconds (see the module docstring)."""

    PREFIX = "difftrain/watchdog/"

    def __init__(self, store, rank: int, world: int, timeout: float, interval: float | None = None):
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(timeout)
        self.interval = interval if interval is not None else min(10.0, max(0.2, self.timeout / 10))
        self.phase, self.step, self.beats, self.last = "startup", 0, 0, time.time()
        self.entered = 0  # phases entered: every rank enters the same sequence, so the lowest count is behind
        self._done = threading.Event()
        self._publish()
        self._thread = threading.Thread(target=self._run, name="difftrain-watchdog", daemon=True)
        self._thread.start()

    def enter(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step
        self.entered += 1
        self.beat()

    def beat(self) -> None:
        self.beats += 1
        self.last = time.time()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _key(self, rank: int) -> str:
        return f"{self.PREFIX}{rank}"

    def _publish(self) -> None:
        self.store.set(self._key(self.rank), f"{self.beats} {self.phase} {self.step} {self.last!r} {self.entered}")

    def _run(self) -> None:
        seen: dict[int, tuple[bytes, float]] = {}
        store_ok = time.monotonic()
        keys = [self._key(r) for r in range(self.world)]
        abort = self.PREFIX + "abort"
        while not self._done.wait(self.interval):
            now = time.monotonic()
            if _alone[0]:
                self.beat()
            try:
                self._publish()
                if self.store.check([abort]):
                    self._exit(self.store.get(abort).decode())
                if self.rank == 0 and self.store.check(keys):
                    for r, v in enumerate(self.store.multi_get(keys)):
                        if r not in seen or seen[r][0] != v:
                            seen[r] = (v, now)
                    still = {r: now - t for r, (_, t) in seen.items()}
                    if min(still.values()) > self.timeout:
                        fields = {r: v.decode().split() for r, (v, _) in seen.items()}
                        # the rank behind the others (fewest phases entered), else the one still the longest
                        r = min(fields, key=lambda r: (int(fields[r][4]), float(fields[r][3])))
                        phase, step = fields[r][1:3]
                        others = ", ".join(f"{q}: {f[1]}" for q, f in sorted(fields.items())[:8] if q != r)
                        msg = (f"rank {r} stalled in phase '{phase}' at step {step}: no rank has made progress for "
                               f"{still[r]:.0f} s (run.timeout={self.timeout:g}; the other ranks' phases: "
                               f"{others or 'none'}); ending the job")
                        self.store.set(abort, msg)
                        self._exit(msg)
                store_ok = now
            except Exception as e:  # the store (torchrun's agent, or rank 0) is gone
                if self._done.is_set():
                    return
                if now - store_ok > self.timeout:
                    self._exit(f"rank {self.rank} lost the job's rendezvous store for {now - store_ok:.0f} s "
                               f"(run.timeout={self.timeout:g}; {type(e).__name__}: {e}); ending the job")

    def _exit(self, message: str) -> None:
        say(f"difftrain: error: {message}")
        os._exit(1)


def default_store():
    """The job's rendezvous store (torchrun's agent store, or the env:// TCPStore)."""
    return dist.distributed_c10d._get_default_store()
