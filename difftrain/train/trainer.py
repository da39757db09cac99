"""The Trainer: one loop for every stage and engine.

build: the shared parts (train/build.py ``Shared``) -> the stage (``STAGES[cfg.stage]``), which declares its modules
       and their roles -> the engine (``ENGINES[parallel.engine]``) materialises, wraps and loads them -> the stage is
       bound to the live modules
step:  next batch (the one after it is already fetched: ``LookAhead``) -> per micro-batch
       stage.frozen -> stage.prepare -> stage.forward -> stage.loss -> engine.backward
       (pipelined, parallel.pp > 1: train/pipeline.py runs the same stage methods through the schedule)
       -> engine.step (clip, optimizer, LR, EMA) -> metrics (device tensors, reduced at log steps)
       -> callbacks (sample grids) -> checkpoint (every N steps, at the end, on SIGTERM)
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from difftrain.config import (IDENTITY, Config, ConfigError, config_changes, config_hash, save_config,
                              save_resume_config, to_dict)
from difftrain.errors import say
from difftrain.data.loader import ShardLoader
from difftrain.launch.env import init_distributed, pick_device, discover
from difftrain.parallelism.dims import Meshes, ParallelDims
from difftrain.train import checkpoint as ckpt
from difftrain.train.build import build_shared, write_model_config
from difftrain.train.engine import ENGINES, NonFiniteError
from difftrain.train.metrics import Metrics
from difftrain.train.stages import STAGES, stage_args
from difftrain.train.stages.base import FROZEN
from difftrain.train.supervise import Preempted, StopAgreement, StopSignal, Watchdog, alone, default_store, hooked


class LookAhead:
    """Iterator wrapper that always holds the next batch, so its frozen work can start early.

    ``close()`` stops the loader (its workers) and is safe to call more than once; when fetching the first
    batch fails, the constructor closes it before raising, so nothing is left running."""

    def __init__(self, it):
        self._it = iter(it)
        try:
            self._next = next(self._it)
        except BaseException:
            self.close()
            raise

    def __next__(self):
        cur, self._next = self._next, next(self._it)
        return cur

    def peek(self):
        return self._next

    def close(self) -> None:
        """Stop the loader's workers now (not at garbage collection, which a reference cycle can defer to exit)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class Trainer:
    def __init__(self, cfg: Config, callbacks: list | None = None, signals: StopSignal | None = None):
        """``signals``: the train command's handler, installed before anything else (else one is installed here)."""
        self.cfg = cfg
        self._own_signals = signals is None  # installed here: given back when fit() ends
        self.signals = signals or StopSignal().install()
        env = discover()
        self.device = pick_device(cfg.run.device, env.local_rank)
        init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.agreement = StopAgreement(self.signals)
        self.dims = ParallelDims.from_config(cfg.parallel, self.world)
        self.meshes = Meshes(self.dims, self.dims.build_mesh(self.device.type))
        self.dp, self.dp_rank = self.dims.dp, self.meshes.dp_rank
        if cfg.data.batch_size % (self.dp * cfg.optim.grad_accum):
            raise ConfigError(f"config key 'data.batch_size' = {cfg.data.batch_size} must be a multiple of "
                              f"data-parallel size {self.dp} x optim.grad_accum {cfg.optim.grad_accum}")
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # RUN/config.yaml is the config of the run's first checkpoint: written while there is none, then kept;
        # each resume writes its own beside it (_check_resume)
        self.config_hash = config_hash(cfg)
        if self.rank == 0 and not ckpt.complete_checkpoints(self.ckpt_root):
            save_config(cfg, self.run_dir)
        dist.barrier()

        # the shared parts, then the stage, which declares its modules; the engine builds, wraps and loads them
        self.shared = build_shared(cfg, self.device, self.meshes)
        self.arch, self.acfg = self.shared.arch, self.shared.acfg
        if self.rank == 0:
            write_model_config(self.arch, self.acfg, self.run_dir)
        self.stage = STAGES[cfg.stage](self.shared, stage_args(cfg))
        self._sampling = None
        from difftrain.finetune.adapt import adapted_specs, changes_of

        self.changes = changes_of(cfg)  # model changes (adapt: LoRA, ...) on the trained modules
        self.specs = adapted_specs(self.stage.modules(), self.changes, cfg.run.seed)
        self.pp_step = None
        if self.dims.pp > 1:  # pipeline parallel (docs/PIPELINE.md): each rank allocates only its segments
            from difftrain.train.pipeline import PipelinedStep, PipelineEngine

            carried = self.stage.carried(cfg)
            others = [n for n, s in self.specs.items()
                      if n != self.stage.trained and s.role != FROZEN and n != carried]
            if others:  # the pipeline cuts one trainable module; the stage should have set pipeline_refusal
                raise ConfigError(f"config key 'parallel.pp' = {cfg.parallel.pp}: stage '{cfg.stage}' declares "
                                  f"modules besides '{self.stage.trained}' ({', '.join(others)}) that are neither "
                                  "frozen nor a carried target, which the pipeline does not hold")
            self.pp_step = PipelinedStep(self)
            spec = self.specs[self.stage.trained]
            self.engine = PipelineEngine(spec.meta(), self.meshes, cfg, self.device, cfg.run.steps,
                                         self.pp_step.loss_fn, source=lambda: spec.init(torch.device("cpu")),
                                         name=self.stage.trained,
                                         carry=(None if carried is None else ("self", None)
                                                if carried == self.stage.trained else ("copy", carried)))
            self.pp_step.engine = self.engine
            for n, s in self.specs.items():  # a frozen teacher: whole on every pp rank (its work is frozen pieces)
                if s.role == FROZEN:
                    self.engine.frozen[n] = s.init(self.device).requires_grad_(False).eval()
        else:
            self.engine = ENGINES[cfg.parallel.engine].from_stage(self.specs, self.meshes, cfg.parallel, cfg.optim,
                                                                  self.device, cfg.run.steps,
                                                                  batch_size=cfg.data.batch_size)
        self.stage.bind(self.engine.live())
        # a frozen module is recorded in checkpoints by its source and fingerprint (a resume refuses another one)
        self.frozen_sources = {n: s.source.fingerprint() for n, s in self.specs.items()
                               if s.role == FROZEN and s.source is not None}
        # a changed module whose base has a source: checkpoints hold what the changes train, the base by fingerprint
        from difftrain.train.sources import base_record

        self.base_sources = {n: base_record(s.base) for n, s in self.specs.items() if s.base is not None}
        self.base_sources.update({n: self.base_sources[s.of] for n, s in self.specs.items()
                                  if s.of in self.base_sources})  # a derived copy (a served target) shares it
        if self.base_sources:
            self.engine.base_keys = {n: keys for n, keys in self.engine.frozen_keys().items()
                                     if n in self.base_sources}
        self._size_shown = False
        self.diffusion, self.conditioner, self.vae = self.shared.diffusion, self.shared.conditioner, self.shared.vae
        self.loader = ShardLoader.from_config(cfg.data, rank=self.dp_rank, world=self.dp, seed=cfg.run.seed)
        self.callbacks = list(callbacks or [])
        self.step = 0
        self._data = None
        self.autocast = self._autocast_dtype()

    def _autocast_dtype(self):
        mp = self.cfg.parallel.mixed_precision
        if mp == "bf16" or (mp == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    # ------------------------------------------------------------------------------- inference
    def sampling(self):
        """The stage's sampler, steps and guidance for its served model (``Stage.sampling``, resolved once: it may
        read the stage's sources)."""
        if self._sampling is None:
            self._sampling = self.stage.sampling(self.cfg)
        return self._sampling

    def served_model(self):
        """The module sampling, validation and export use (inside ``engine.ema_swapped_in()``: its EMA weights)."""
        return self.engine.live()[self.stage.served]

    # ------------------------------------------------------------------------------ checkpoint
    def _tensors(self) -> dict:
        return {**self.engine.state_dict(), "rng": {"cpu": torch.get_rng_state()}}

    def save(self) -> Path:
        # Never a checkpoint of a run that has gone bad: stop on a run of skipped steps, refuse non-finite weights
        # (nothing is written, so the previous checkpoints stay and pruning removes none of them).
        self.check_health()
        if not self.engine.finite_state():
            newest = ckpt.latest_checkpoint(self.ckpt_root)
            raise NonFiniteError(f"step {self.step}: the weights or their EMA are not finite; no checkpoint written "
                                 f"(newest complete checkpoint: {newest if newest is not None else 'none'})")
        # The look-ahead batch is fetched but not trained on: resume must start with it.
        data = self.loader.state_dict(self._data.peek()["position"]["g"] if self._data is not None else None)
        state = {"step": self.step, "updates": int(self.engine.updates), "data_g": data["g"], "world_size": self.world,
                 "config_hash": self.config_hash, "config": to_dict(self.cfg), "stage": self.cfg.stage,
                 "served": self.stage.served, "modules": {n: s.role for n, s in self.specs.items()},
                 "sampling": dataclasses.asdict(self.sampling()), "stage_state": self.stage.state_dict(),
                 "frozen": self.frozen_sources, "base": self.base_sources}
        tensors = self._tensors()
        saved = ckpt.save(self.ckpt_root, self.step, tensors, state, self.cfg.run.keep_last, rank_state={"data": data})
        if not self._size_shown:
            self._size_shown = True
            self._show_size(tensors)
        return saved

    def _show_size(self, tensors: dict) -> None:
        """One line at the first save: the bytes a checkpoint holds (whole tensors, summed over ranks), and for
        model changes over a base with a source, what is left out."""
        if self.rank != 0:
            return
        size = ckpt.checkpoint_bytes(tensors)
        line = f"checkpoint size: {size / 2**20:.2f} MiB of tensors per save"
        if self.base_sources:
            left = ", ".join(f"'{n}' base {r['source']} (fingerprint {r['sha256']})" for n, r in self.base_sources.items())
            line += f"; model changes ({', '.join(c.kind for c in self.changes)}): what they train only, not {left}"
        print(line, flush=True)

    def maybe_resume(self) -> bool:
        if ckpt.latest_checkpoint(self.ckpt_root) is None:
            return False
        tensors = self._tensors()
        reading = dict(tensors)  # what DCP reads into: the same tensors, in the checkpoint's own layout

        def before_load(state: dict) -> None:
            self._check_resume(state)
            reading.clear()
            reading.update(tensors if "served" in state else _flat_layout(tensors, self.stage.served))

        # the newest complete checkpoint that loads; a corrupt one is named in a warning and the previous is used
        found = ckpt.resume_newest(self.ckpt_root, reading, before_load=before_load)
        if found is None:
            return False
        last, state = found
        self.step = state["step"]
        self.engine.load_state_dict(tensors, self.step, updates=state.get("updates"))
        self.stage.load_state_dict(state.get("stage_state") or {})
        torch.set_rng_state(tensors["rng"]["cpu"])
        try:  # the data-loader states of the same checkpoint as the tensors
            self.loader.load_state_dict([r["data"] for r in ckpt.read_rank_states(last, state.get("world_size"))])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"checkpoint {last}: {e}") from None
        if self.rank == 0:
            print(f"resumed from {last} (step {self.step}, saved by {state.get('world_size')} ranks)", flush=True)
        return True

    def _check_resume(self, state: dict) -> None:
        """Called with a checkpoint's train state before any of its tensors is read; raising refuses the resume.

        The resume guard (docs/RELIABILITY.md): a changed *identity* field (what is trained) is refused in one line
        naming every changed key with its old and new values, unless ``run.allow_config_change``; *budget* and
        *execution* changes are logged, one line each. Every rank reads the same file and decides the same, so none
        is left waiting. Rank 0 then keeps this resume's config beside the first (``config.resume-STEP.yaml``)."""
        step, saved = state.get("step"), state.get("config")
        log = self.rank == 0
        # a frozen module, and the frozen base of a changed one, is the weights it was trained against
        for kind, sources in (("frozen", self.frozen_sources), ("base", self.base_sources)):
            for name, now in sources.items():
                then = (state.get(kind) or {}).get(name)
                if then is not None and then["sha256"] != now["sha256"] and not self.cfg.run.allow_config_change:
                    what = f"frozen module '{name}'" if kind == "frozen" else f"the frozen base of '{name}'"
                    raise ConfigError(f"resume of step {step} from '{self.ckpt_root}' refused: {what} was "
                                      f"{then['source']} (step {then['step']}, fingerprint {then['sha256']}), now "
                                      f"{now['source']} (step {now['step']}, fingerprint {now['sha256']}) (restore "
                                      "it, start a new run.dir, or set run.allow_config_change=true)")
        if not isinstance(saved, dict):  # a checkpoint from before configs were saved in it: the hash only
            if log and state.get("config_hash") != self.config_hash:
                say(f"difftrain: warning: resuming step {step}, saved with config hash {state.get('config_hash')}, "
                    f"with config hash {self.config_hash}; the checkpoint holds no config to tell which keys changed")
        else:
            changes = config_changes(saved, self.cfg)
            identity = [c for c in changes if c.tag == IDENTITY]
            if identity and not self.cfg.run.allow_config_change:
                raise ConfigError(f"resume of step {step} from '{self.ckpt_root}' refused: the config changes what "
                                  f"is trained: {'; '.join(map(str, identity))} (resume with the checkpoint's "
                                  "values, start a new run.dir, or set run.allow_config_change=true)")
            for c in changes if log else ():
                allowed = " (allowed by run.allow_config_change)" if c.tag == IDENTITY else ""
                print(f"resume: {c.tag} change {c}{allowed}", flush=True)
        if log:
            save_resume_config(self.cfg, self.run_dir, step)

    # ------------------------------------------------------------------------------------ loop
    def train_step(self, batch: dict) -> None:
        # batch["index"]: each sample's global position in the stream (the key of its randomness).
        # A rank's slice can be short when bad samples were dropped; micro-batches split what is there.
        if self.pp_step is not None:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                self.pp_step(batch, self._data.peek() if self._data is not None else None)
            return
        accum = self.cfg.optim.grad_accum
        n = len(batch["index"])
        bounds = [n * i // accum for i in range(accum + 1)]
        nan = ckpt.fault("nan_loss", self.step + 1)  # test hook (DIFFTRAIN_FAULT=nan_loss:STEP:RANK)
        loss_sum = torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for i in range(accum):
            mb = {k: v[bounds[i]:bounds[i + 1]] for k, v in batch.items() if k != "position"}
            with self.engine.accumulating(last=i == accum - 1):
                fb = self.stage.frozen(mb, self.step)
                prep = self.stage.prepare(fb, self.step)
                with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    pred = self.stage.forward(prep)
                if nan:
                    pred = pred * float("nan")
                loss, per_sample = self.stage.loss(pred, prep)
                loss_sum += loss.detach()
                self.engine.backward(loss / accum)
            self.metrics.add_samples(per_sample, prep["t"])
        t1 = time.perf_counter()
        gnorm, ok = self.engine.step(self.step, loss_sum)  # skipped on every rank when anything is non-finite
        self.stage.after_step(self.step, ok)  # derived modules (a target network) follow the update
        t2 = time.perf_counter()
        self.metrics.add_step(gnorm, ok, fwd_bwd=t1 - t0, optim=t2 - t1, step=self.step + 1, keys=batch.get("keys"),
                              loss_ok=torch.isfinite(loss_sum))

    def check_health(self) -> None:
        """Collective, a host sync: at log steps and before every checkpoint. Ends the run once ``optim.max_bad_steps``
        consecutive steps were skipped for a non-finite loss or gradient, naming the step where the limit was reached
        and the sample keys of its batch (those of the ranks whose own loss was non-finite, else every rank's)."""
        metrics = getattr(self, "metrics", None)  # None before fit() starts
        limit = self.cfg.optim.max_bad_steps
        step = metrics.limit_reached(limit) if metrics is not None else None  # the same on every rank (agreed skips)
        if step is None:
            return
        every = [None] * self.world
        dist.all_gather_object(every, metrics.batch_of(step))
        keys = [k for ks, loss_ok in every if not loss_ok for k in ks] or [k for ks, _ in every for k in ks]
        keys = list(dict.fromkeys(keys))  # pipeline ranks of one data-parallel slice share a batch
        shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        newest = ckpt.latest_checkpoint(self.ckpt_root)
        raise NonFiniteError(
            f"step {step}: non-finite loss or gradients in {limit} consecutive steps (optim.max_bad_steps={limit}), "
            f"each skipped; the batch of step {step}: {shown or 'no keys'}; newest complete checkpoint: "
            f"{newest if newest is not None else 'none'}")

    def fit(self) -> dict:
        """Train to ``run.steps``. Stops early, after saving, when a signal is agreed (raises ``Preempted``)."""
        cfg = self.cfg
        self.maybe_resume()
        self.metrics = Metrics(self.run_dir, self.rank, self.meshes.dp, self.device, cfg.run, self.step)
        watchdog = Watchdog(default_store(), self.rank, self.world, cfg.run.timeout) if cfg.run.timeout > 0 else None
        last_log, stopped = {}, False
        trace = None
        if cfg.run.trace_samples:  # an audit of the data order: the keys each step trained on, per rank
            (self.run_dir / "trace").mkdir(parents=True, exist_ok=True)
            trace = open(self.run_dir / "trace" / f"rank_{self.rank:05d}.jsonl", "a")
        self.signals.immediate = False  # from here on a signal stops the run at an agreed step, after saving it
        try:
            with hooked(watchdog.beat if watchdog is not None else _nothing):
                while self.step < cfg.run.steps:
                    self.agreement.start()
                    self._phase(watchdog, "data")
                    t_data = time.perf_counter()
                    if self._data is None:
                        self._data = LookAhead(self.loader)
                    batch = next(self._data)
                    self.metrics.add_data_time(time.perf_counter() - t_data)
                    self._phase(watchdog, "step")
                    self.train_step(batch)
                    self.step += 1
                    if trace is not None:
                        trace.write(json.dumps({"step": self.step, "keys": list(batch["keys"])}) + "\n")
                        trace.flush()
                    if ckpt.fault("kill_at_step", self.step):
                        os.kill(os.getpid(), signal.SIGKILL)
                    stopped = self.agreement.result()
                    is_log = self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps
                    if is_log:
                        self._phase(watchdog, "log")
                        last_log = self.metrics.log(self.step, lr=self.engine.lr(), batch_size=cfg.data.batch_size,
                                                    data_counts=self.loader.counts())
                        self.check_health()  # a run of non-finite steps ends the run (logged first)
                    if not stopped:
                        self._phase(watchdog, "callbacks")
                        stopped = self._callbacks()
                    if stopped or self.step == cfg.run.steps or (cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0):
                        self._phase(watchdog, "save")
                        saved = self.save()
                    if stopped:
                        raise self.signals.stopped(f"saved step {self.step} ({saved})")
        finally:
            if self._own_signals:
                self.signals.restore()
            if trace is not None:
                trace.close()
            self.agreement.close()
            if watchdog is not None:
                watchdog.close()
            self.metrics.close()
            if self._data is not None:
                self._data.close()
        return last_log

    def _phase(self, watchdog, name: str) -> None:
        if watchdog is not None:
            watchdog.enter(name, self.step)
        if ckpt.fault(f"stall_in_{name}", self.step):  # test hooks: this rank stops making progress here,
            time.sleep(1e9)
        if ckpt.fault(f"slow_in_{name}", self.step):  # or works 4 s longer by itself while the others wait
            with alone():
                time.sleep(4)

    def _callbacks(self) -> bool:
        """Sample grids, validation: every rank in lockstep, stopped together at a model call when a signal is
        agreed there (``supervise.point``). Returns whether it was."""
        def poll():
            if self.agreement.now():
                raise self.signals.stopped("agreed during callbacks")

        try:
            with hooked(poll):
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
        except Preempted:
            return True
        return False


def _nothing() -> None:
    pass


def _flat_layout(tensors: dict, served: str) -> dict:
    """The engine's tensors under a checkpoint's keys from before stages owned their modules (one module, no name:
    ``model.FQN``, ``optim.FQN.*``, ``ema.FQN``): the same tensor objects, so reading into them resumes the run."""
    prefix = served + "."

    def strip(d: dict) -> dict:
        if any(not k.startswith(prefix) for k in d):
            raise ConfigError(f"a checkpoint from before named modules holds one module; this stage has others "
                             f"besides '{served}'")
        return {k[len(prefix):]: v for k, v in d.items()}

    return {**tensors, **{k: strip(tensors[k]) for k in ("model", "optim", "ema") if k in tensors}}
