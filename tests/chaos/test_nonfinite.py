"""Issue 14, must-have 3: a non-finite loss or gradient never reaches the weights.

In process (a gloo group of one, as the trainer makes for a single process): a step whose loss is made NaN
(``DIFFTRAIN_FAULT=nan_loss:STEP:RANK``) leaves weights, optimizer state, EMA and learning rate bitwise as they
were and is counted in tensorboard; the step loop makes no host sync (``aten._local_scalar_dense``) outside log
and checkpoint steps; non-finite weights are never checkpointed. Processes (slow): ``optim.lr=1e6`` ends a 2-rank
job after ``optim.max_bad_steps`` skipped steps in one line, its checkpoints finite; NaN on one rank only is
skipped by every rank under DDP, FSDP2 and a 2-stage pipeline, which then end where a single process that
skipped the same step ends.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from difftrain.config_checks import load_config
from difftrain.train.checkpoint import complete_checkpoints
from difftrain.train.engine import NonFiniteError
from difftrain.train.trainer import Trainer
from tests.chaos.jobs import Job, trace
from tests.conftest import REPO, torchrun
from tests.distributed.test_equivalence import COMMON as EQUIV, MODELS
from tests.distributed.test_resume import COMMON, weights

FAULT = "DIFFTRAIN_FAULT"


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """The trainers below start a gloo group of one in this process; end it (and its rendezvous env) afterwards."""
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def trainer(digits, run_dir, *overrides, callbacks=()) -> Trainer:
    cfg = load_config(REPO / COMMON[0], [*COMMON[1:], f"data.train={digits['train']}", f"run.dir={run_dir}",
                                         "data.num_workers=0", *overrides])
    return Trainer(cfg, callbacks=list(callbacks))


def fit(t: Trainer) -> dict:
    try:
        return t.fit()
    finally:
        t.signals.restore()


class Snapshots:
    """Callback: a copy of everything a step may change, after every step."""

    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_step_end(self, t: Trainer, step: int) -> None:
        eng = t.engine
        named = list(eng.module.named_parameters())
        self.at[step] = {
            "model": {n: p.detach().clone() for n, p in named},
            "optim": {f"{n}.{k}": v.clone() for n, p in named for k, v in eng.optimizer.state[p].items()},
            "ema": {n: v.clone() for n, v in eng.ema.state_dict().items()},
            "lr": eng.lr(),
        }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_nan_step_is_skipped_bitwise_and_counted(digits, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT, "nan_loss:3:0")
    snaps = Snapshots()
    t = trainer(digits, tmp_path / "run", "run.steps=4", "run.ckpt_every=0", "optim.warmup_steps=10",
                callbacks=[snaps])
    fit(t)
    s = snaps.at
    for part in ("model", "optim", "ema"):
        assert same(s[3][part], s[2][part]), f"{part} changed in the skipped step"
        assert not same(s[4][part], s[3][part]), f"{part} did not change in the step after it"
    steps = lambda k: {v.item() for n, v in s[k]["optim"].items() if n.endswith(".step")}  # noqa: E731
    assert steps(2) == steps(3) == {2.0} and steps(4) == {3.0}  # fused AdamW's own count of applied updates
    # the schedule is indexed by applied updates: warm-up (k + 1) / 10 at k = 2, 2, 3
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    assert [s[k]["lr"] for k in (2, 3, 4)] == [f32(1e-3 * 0.3), f32(1e-3 * 0.3), f32(1e-3 * 0.4)]
    assert scalars(t.run_dir, "skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 0}
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars(t.run_dir, "loss").values())


def test_a_run_of_bad_steps_stops_the_run_even_after_it_recovered(digits, tmp_path, monkeypatch):
    """``optim.max_bad_steps=1``: step 2 alone reaches the limit; the check at the next log step (the last, 4)
    still ends the run, naming step 2 and the samples it trained on, before the final checkpoint."""
    monkeypatch.setenv(FAULT, "nan_loss:2:0")
    t = trainer(digits, tmp_path / "run", "run.steps=4", "run.log_every=100", "run.ckpt_every=0",
                "optim.max_bad_steps=1", "run.trace_samples=true")
    with pytest.raises(NonFiniteError) as e:
        fit(t)
    keys = trace(t.run_dir)[2]
    assert str(e.value) == (f"step 2: non-finite loss or gradients in 1 consecutive steps (optim.max_bad_steps=1), "
                            f"each skipped; the batch of step 2: {', '.join(keys[:4])} (+{len(keys) - 4} more); "
                            "newest complete checkpoint: none")
    assert complete_checkpoints(t.run_dir / "checkpoints") == []
    assert scalars(t.run_dir, "skipped_steps") == {4: 1}


class HostSyncs(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, a tensor index...) by the
    trainer's step counter, and separately inside ``train_step``."""

    def __init__(self, t: Trainer):
        super().__init__()
        self.t, self.by_step, self.in_step = t, {}, 0
        self.stepping = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_step[self.t.step] = self.by_step.get(self.t.step, 0) + 1
            self.in_step += self.stepping
        return func(*args, **(kwargs or {}))


def test_no_host_sync_outside_log_and_checkpoint_steps(digits, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT, "nan_loss:3:0")  # the skip path too
    n = 6
    t = trainer(digits, tmp_path / "run", f"run.steps={n}", "run.log_every=100", "run.ckpt_every=100")
    mode = HostSyncs(t)
    step = t.train_step

    def counted(batch):
        mode.stepping = True
        try:
            step(batch)
        finally:
            mode.stepping = False

    t.train_step = counted
    with mode:
        out = fit(t)
    assert out["skipped_steps"] == 1
    assert mode.in_step == 0, mode.by_step
    # between the steps as well (loader, metrics, signal agreement): only setup (step 0) and the final log + save
    assert all(mode.by_step.get(k, 0) == 0 for k in range(1, n)), mode.by_step
    assert mode.by_step.get(n, 0) > 0  # the counter works: the final log and checkpoint do sync


@pytest.mark.parametrize("where", ["model", "ema"])
def test_non_finite_weights_are_never_checkpointed(digits, tmp_path, where):
    class Poison:
        def on_step_end(self, t, step):
            if step == 3:
                target = next(t.engine.module.parameters()) if where == "model" else \
                    next(iter(t.engine.ema.state_dict().values()))
                with torch.no_grad():
                    target.view(-1)[0] = float("inf")

    t = trainer(digits, tmp_path / "run", "run.steps=5", "run.ckpt_every=1", "run.keep_last=2",
                callbacks=[Poison()])
    with pytest.raises(NonFiniteError) as e:
        fit(t)
    ckpts = t.run_dir / "checkpoints"
    assert re.fullmatch(r"step 3: the weights or their EMA are not finite; no checkpoint written "
                        rf"\(newest complete checkpoint: {re.escape(str(ckpts))}/step_00000002\)", str(e.value))
    assert [s for s, _ in complete_checkpoints(ckpts)] == [1, 2]
    assert sorted(d.name for d in ckpts.iterdir() if d.name.startswith("step_")) == ["step_00000001", "step_00000002"]
    for which in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in weights(t.run_dir, which)[1].values())


@pytest.mark.slow
def test_lr_1e6_stops_after_max_bad_steps_with_finite_checkpoints(digits, tmp_path):
    """The issue's reproduction: the loss becomes NaN after a few steps; every later step is skipped, and after
    ``optim.max_bad_steps`` of them the job ends in one line naming the step and its samples."""
    job = Job(tmp_path / "lr", digits, "optim.lr=1e6", "optim.max_bad_steps=3", "run.steps=40", "run.log_every=5",
              "run.ckpt_every=2", "run.keep_last=2")
    rc = job.wait(240)
    assert rc != 0
    last = job.messages()[-1]
    m = re.fullmatch(r"difftrain: error: step (\d+): non-finite loss or gradients in 3 consecutive steps "
                     r"\(optim\.max_bad_steps=3\), each skipped; the batch of step \1: (\d{9}, ){3}\d{9} "
                     r"\(\+\d+ more\); newest complete checkpoint: (.+)", last)
    assert m, job.output()[-3000:]
    limit = int(m.group(1))
    # checked at log steps and before saves: the job ended at the first of either from the limit on, saving nothing
    end = min(s for s in range(limit, 41) if s % 5 == 0 or s % 2 == 0)
    done = complete_checkpoints(job.run_dir / "checkpoints")
    assert [s for s, _ in done] == [s for s in range(2, end, 2)][-2:]
    assert m.group(3) == str(done[-1][1])
    for which in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in weights(job.run_dir, which)[1].values())
    assert not job.leftovers()


@pytest.fixture(scope="module")
def one_rank_nan(digits, tmp_path_factory):
    """Step 3's loss is NaN on rank 1 only (rank 0 of the single process): DDP, FSDP2 and pp=2 on 2 ranks."""
    out = tmp_path_factory.mktemp("nan")
    base = f"{EQUIV} {MODELS['unet']} data.train={digits['train']}"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"), "unet", f"{base} run.dir={out}/single"],
             env={FAULT: "nan_loss:3:0"})
    cases = {"ddp": "parallel.engine=ddp", "fsdp2": "parallel.engine=fsdp2",
             "pp2": "parallel.pp=2 parallel.pp_microbatches=4 parallel.pp_schedule=1f1b"}
    args = [a for name, extra in cases.items() for a in (name, f"{base} {extra} run.dir={out}/{name}")]
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"), *args], env={FAULT: "nan_loss:3:1"}, timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ddp", "fsdp2", "pp2"])
def test_nan_on_one_rank_is_skipped_by_every_rank(one_rank_nan, case):
    for run in ("single", case):
        assert scalars(one_rank_nan / run, "skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0}, run
    for which in ("model", "ema"):  # from the checkpoints, which a pipeline's stages write together
        (ref_step, ref), (step, got) = weights(one_rank_nan / "single", which), weights(one_rank_nan / case, which)
        assert ref_step == step == 5 and ref.keys() == got.keys()
        for k in ref:
            assert torch.isfinite(got[k]).all(), k
            diff = (ref[k] - got[k]).abs().max().item()
            assert diff <= 1e-5, f"{case} {which}: {k} differs by {diff}"
