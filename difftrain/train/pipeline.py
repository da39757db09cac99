"""The trainer's pipeline-parallel path (``parallel.pp > 1``, docs/PIPELINE.md).

:class:`PipelineEngine` is a ``TorchEngine`` over this rank's segment(s): the backbone is cut at
``parallel.pp_bounds`` (or by the partitioner over FLOP costs counted on the meta device), each segment is sharded
on the dp mesh (FSDP2) or, with the ddp engine, its gradients are all-reduced over the dp ranks after the
schedule (``sync_grads``), and it is run by the chosen schedule. The optimizer, EMA and
checkpoints see the segments under the whole model's parameter names, so a pipelined checkpoint resumes in a plain
run and back (DCP reshards by name). The gradient norm for clipping is summed over the pp ranks.

:class:`PipelinedStep` is one training step: the stage's ``frozen`` work of every micro-batch, by module
(``Stage.frozen_pieces``; computed in the previous step's bubbles with ``pp_frozen=fill``, in the step's own
bubbles when nothing was prefetched, or an equal share per pp rank up front with ``balanced``; with
``pp_frozen_owners=partition`` each module only on the pp ranks holding it), then ``prepare`` where the outputs
are (the same keyed noise everywhere), the schedule, and the per-sample losses and times sent from the last
segment to the other pp ranks for the metrics.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.distributed as dist
from torch import nn

from difftrain.config import Config, ConfigError, ParallelConfig
from difftrain.parallelism.dims import Meshes
from difftrain.parallelism.parallelize import parallelize
from difftrain.parallelism.pipeline.costs import HARDWARE, Profile, meta_inputs, profile_blocks, profile_frozen
from difftrain.parallelism.pipeline.segments import cond_keys, num_blocks
from difftrain.train import checkpoint as ckpt
from difftrain.train.engine import TorchEngine

_HW = HARDWARE["h100"]  # FLOP costs only rank blocks against each other here: any hardware gives the same plan


def frozen_mode(cfg: Config) -> str:
    mode = cfg.parallel.pp_frozen
    if mode == "auto":
        return "fill" if cfg.parallel.pp_schedule in ("gpipe", "1f1b") else "balanced"
    return mode


def segment_bounds(pcfg: ParallelConfig, model: nn.Module, n_segments: int, frames: int,
                   text_len: int) -> list[tuple[int, int]]:
    """``parallel.pp_bounds`` as block ranges, or the partitioner's choice over FLOP costs (identical on every
    rank: counted, not timed; ``frames`` / ``text_len``: the inputs' video frames and caption length)."""
    n = num_blocks(model)
    cuts = list(pcfg.pp_bounds)
    if cuts:
        edges = [0, *cuts, n]
        if len(cuts) != n_segments - 1 or any(a >= b for a, b in zip(edges, edges[1:])):
            raise ConfigError(f"config key 'parallel.pp_bounds' = {cuts}: need {n_segments - 1} increasing block "
                              f"indices in 1..{n - 1} (the first block of segments 1..{n_segments - 1})")
        return list(zip(edges, edges[1:]))
    if n < n_segments:
        raise ConfigError(f"config key 'parallel.pp' = {pcfg.pp}: {n_segments} segments for {n} blocks")
    from difftrain.parallelism.pipeline.partition import partition

    costs = block_costs(model, frames, text_len)
    return partition([c.fwd + c.bwd for c in costs], n_segments)


def block_costs(model: nn.Module, frames: int, text_len: int, batch: int = 1):
    meta = copy.deepcopy(model).to("meta")
    return profile_blocks(meta, meta_inputs(model.config, frames, text_len, batch), "flops", _HW)


@torch.no_grad()
def broadcast_init(modules: list[nn.Module], whole_meta: nn.Module, source, device: torch.device) -> None:
    """Fill this rank's empty segment modules with the run's initial weights: global rank 0 builds the whole model
    once in host memory (``source()``: the seeded init and ``init_from``, as a plain run builds it on the CPU)
    and broadcasts it tensor by tensor; every rank keeps the tensors of its segments and drops the rest, so no other
    rank ever holds the whole model."""
    with ckpt.reading_alone():  # weights read from a run's checkpoint: rank 0's own DCP load, no collective
        whole = source() if dist.get_rank() == 0 else None
    src = {**dict(whole.named_parameters()), **dict(whole.named_buffers())} if whole is not None else {}
    mine = {n: t for m in modules for n, t in (*m.named_parameters(), *m.named_buffers())}
    for name, meta in (*whole_meta.named_parameters(), *whole_meta.named_buffers()):
        buf = mine[name].data if name in mine else torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if whole is not None:
            buf.copy_(src[name])
        dist.broadcast(buf, src=0)


class PipelineEngine(TorchEngine):
    def __init__(self, module: nn.Module, meshes: Meshes, cfg: Config, device: torch.device, total_steps: int,
                 loss_fn, source=None, name: str = "backbone", carry: tuple[str, str | None] | None = None):
        """``module``: the whole backbone, materialised or on the meta device; then ``source()`` builds the
        initial weights once, on global rank 0 (:func:`broadcast_init`). ``carry``: the stage's target network
        carried through the segments (``Stage.carried``): ``(mode, derived module name or None)``."""
        from difftrain.parallelism.pipeline.runtime import build_pipeline

        pcfg = cfg.parallel
        self.pp_group = meshes.pp.get_group()
        self.norm_group = self.pp_group
        self.pp, self.pp_rank = meshes.dims.pp, meshes.pp.get_local_rank()
        per_rank = 2 if pcfg.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1
        self.bounds = segment_bounds(pcfg, module, self.pp * per_rank, cfg.model.frames, cfg.encoders.text_max_length)
        self.fill = frozen_mode(cfg) == "fill"
        self.device = device
        if all(t.is_meta for t in module.parameters()):  # the architecture only (with any model changes applied):
            self.whole = copy.deepcopy(module)  # sampling fills it with the gathered EMA weights
        else:
            with torch.device("meta"):
                self.whole = type(module)(module.config)
        init = (lambda mods: broadcast_init(mods, self.whole, source, device)) if source is not None else None
        self.pipe = build_pipeline(module, self.bounds, pcfg.pp_schedule, pcfg.pp_microbatches, loss_fn,
                                   self.pp_group, device, fill=self.fill,
                                   wrap=lambda m: parallelize(m, meshes, pcfg, device, ddp=False), init=init,
                                   carry=carry[0] if carry else None)
        self.dp_group = meshes.dp.get_group() if pcfg.engine == "ddp" and meshes.dims.dp > 1 else None
        from difftrain.quant.modules import set_calibration_group

        for m in [*self.pipe.modules, *(self.pipe.targets or [])]:  # a segment's replicas: its dp ranks
            set_calibration_group(m, meshes.dp.get_group())
        # the pp ranks again, as a group of their own for frozen outputs delivered mid-step (fill.CurrentFill)
        grid = meshes.world.mesh.reshape(self.pp, -1)
        self.p2p_group, _ = dist.new_subgroups_by_enumeration([grid[:, c].tolist() for c in range(grid.shape[1])])
        self.name = name  # the stage's trained module: the one cut into segments
        self._swapped = None  # the whole model with the EMA weights, inside ema_swapped_in
        super().__init__({name: self.pipe.union()}, meshes, pcfg, cfg.optim, device, total_steps, wrapped=True)
        if carry and carry[1]:  # the target network's segments: a derived module under the whole model's names
            self.derived[carry[1]] = self.pipe.target_union()
            self.derived_of[carry[1]] = name
        self.last_owner = 0 if pcfg.pp_schedule == "zero_bubble" else self.pp - 1
        self.offloaded: list[nn.Module] = []

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Data-parallel mean of the segment gradients (engine ddp; FSDP2 reduce-scatters inside the schedule)."""
        if self.dp_group is None:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        flat /= dist.get_world_size(self.dp_group)
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)

    @contextlib.contextmanager
    def ema_swapped_in(self):
        """``live()`` holds the whole model with every segment's EMA weights (gathered over the pp ranks) while
        inside: sampling and validation run it as usual. Needs the whole model to fit one device."""
        from difftrain.parallelism.tensor_parallel import full_tensor

        def whole(t):
            return full_tensor(t).detach().cpu()

        # the EMA of what trains, the live weights of what does not (a frozen base under model changes)
        mine = {n: whole(t) for n, t in self.pipe.union().named_parameters() if not t.requires_grad}
        mine.update({n.removeprefix(self.name + "."): whole(t) for n, t in self.ema.state_dict().items()})
        union = self.pipe.union()
        persistent = union.state_dict().keys()  # buffers a checkpoint holds (not the non-persistent ones)
        mine.update({n: whole(t) for n, t in union.named_buffers() if n in persistent})
        parts = [None] * self.pp
        dist.all_gather_object(parts, mine, group=self.pp_group)
        state = {k: v for p in parts for k, v in p.items()}
        names = {n for n, _ in self.whole.named_parameters()}
        if names - state.keys():
            raise RuntimeError(f"EMA gathered over the pipeline lacks {sorted(names - state.keys())[:3]}")
        full = copy.deepcopy(self.whole).to_empty(device=self.device)  # every parameter is in the state
        full.load_state_dict(state, strict=False)
        self._swapped = full.eval()
        for m in self.offloaded:
            m.to(self.device)
        try:
            yield
        finally:
            self._swapped = None
            for m in self.offloaded:
                m.to("cpu")

    def live(self) -> dict[str, nn.Module]:
        """Inside :meth:`ema_swapped_in` the whole model with the EMA weights; else this rank's segments."""
        return {self.name: self._swapped if self._swapped is not None else self.pipe.union(), **self.frozen,
                **self.derived}

    @property
    def model(self) -> nn.Module:
        return self.live()[self.name]

    def offload(self, modules: list[nn.Module]) -> None:
        """Frozen modules this rank does not hold: in host memory during training steps (their work runs on
        other pp ranks), on the device inside :meth:`ema_swapped_in` (sampling and validation run on every
        rank)."""
        self.offloaded = modules
        for m in modules:
            m.to("cpu")


class PipelinedStep:
    """One pipelined training step of the trainer (see the module docstring)."""

    def __init__(self, trainer):
        self.t = trainer
        self.engine: PipelineEngine | None = None  # set once the engine exists (it takes loss_fn)
        self.M = trainer.cfg.parallel.pp_microbatches
        self.per_rank = trainer.cfg.data.batch_size // trainer.dp
        if self.per_rank % self.M:
            raise ConfigError(f"config key 'parallel.pp_microbatches' = {self.M} must divide the per-rank batch "
                              f"{self.per_rank} (data.batch_size / data-parallel size)")
        self.next = None  # the next step's frozen outputs, computed in this step's bubbles (fill)
        self.placement = None  # this rank's slots for the next step's frozen work (fill)
        self.current = None  # every rank's pieces of a step's own frozen work when nothing was prefetched (fill)
        self.owners = None  # frozen piece -> the pp ranks holding its module (None: every rank holds every one)
        self.provides: list[tuple[str, tuple]] = []  # (group of pieces, what it provides), in groups() order
        self.spec: dict = {}  # frozen output shapes, shared by every step's FrozenFill
        self.per_sample: list[torch.Tensor] = []
        self.nan = False
        self.layout: list[tuple[str, tuple]] = []  # (loss key, per-sample shape) of the packed loss tensors
        if "weight" not in trainer.stage.loss_keys:
            raise ConfigError(f"stage '{trainer.cfg.stage}' cannot be pipelined: its loss_keys have no 'weight' "
                              "(the pipeline weights padding samples 0)")

    @property
    def keys(self):
        return cond_keys(self.engine.whole)

    @staticmethod
    def groups(pieces) -> list[list]:
        """The frozen pieces as the pipeline places them: a piece that ``needs`` others runs after them on the same
        samples and rank (a teacher's step after the latents and caption states it reads), so each such chain is
        one group; a piece nothing needs is a group of its own. In ``frozen_pieces`` order."""
        by_name = {p.name: p for p in pieces}
        group_of = {p.name: i for i, p in enumerate(pieces)}
        for p in pieces:
            for need in p.needs:
                if need not in by_name:
                    raise ValueError(f"frozen piece {p.name!r} needs {need!r}, which the stage does not declare")
                old, new = group_of[need], group_of[p.name]
                group_of = {k: (new if g == old else g) for k, g in group_of.items()}
        out: dict[int, list] = {}
        for p in pieces:
            out.setdefault(group_of[p.name], []).append(p)
        return list(out.values())

    def _flat(self, piece, out: dict) -> list[torch.Tensor]:
        return [t for key in piece.provides for t in
                ([out["cond"][k] for k in self.keys] if key == "cond" else [out[key]])]

    def _frozen(self, step: int, placement=None):
        """The stage's ``frozen`` work by group of pieces (:meth:`groups` of ``Stage.frozen_pieces``), each returning
        its pieces' outputs, batch-first, in order; a group whose modules this rank does not hold
        (``pp_frozen_owners=partition``) is not callable here."""
        from difftrain.parallelism.pipeline.fill import FrozenFill, FrozenModule

        mods = []
        for group in self.groups(self.t.stage.frozen_pieces(step)):
            def run(mb: dict, group=group) -> tuple:
                flat, batch = [], dict(mb)
                for piece in group:
                    out = piece.fn(batch)
                    batch.update(out)
                    flat += self._flat(piece, out)
                return tuple(flat)

            name = "+".join(p.name for p in group)
            held = self.owners is None or self.engine.pp_rank in self.owners[name]
            mods.append(FrozenModule(name, run if held else None))
        return FrozenFill(mods, placement or {}, self.engine.pp_group, self.t.device, self.spec)

    def _unpack(self, o: dict[str, tuple]) -> dict:
        """One micro-batch's frozen outputs by group -> the frozen batch's keys (``x0``, ``cond``, teacher work)."""
        out = {}
        for name, provides in self.provides:
            vals = list(o[name])
            for key in provides:
                if key == "cond":
                    out["cond"], vals = dict(zip(self.keys, vals)), vals[len(self.keys):]
                else:
                    out[key] = vals.pop(0)
        return out

    def _plan(self, mbs: list[dict], step: int) -> None:
        """Which pp ranks hold which frozen module (``pp_frozen_owners``) and where the frozen work goes: the
        simulator's placement over FLOP costs (identical on every rank), from the first micro-batch. Modules
        this rank does not hold move to host memory (back on the device for sampling and validation)."""
        from difftrain.parallelism.pipeline.simulate import choose_owners, current_plan, simulate

        self.placement = {}
        groups = self.groups(self.t.stage.frozen_pieces(step))
        self.provides = [("+".join(p.name for p in g), tuple(k for p in g for k in p.provides)) for g in groups]
        partition = self.t.cfg.parallel.pp_frozen_owners == "partition"
        if not (self.engine.fill or partition):
            return
        size = len(mbs[0]["index"])
        fill = self._frozen(step)
        costs = [profile_frozen(name, lambda name=name: fill.modules[name](mbs[0]), "flops", _HW,
                                params=sum(q.numel() for p in g if p.module is not None for q in p.module.parameters()))
                 for (name, _), g in zip(self.provides, groups)]
        cfg = self.t.cfg
        prof = Profile(block_costs(self.engine.whole, cfg.model.frames, cfg.encoders.text_max_length, size), costs,
                       size)
        schedule, bounds = self.t.cfg.parallel.pp_schedule, self.engine.bounds
        if partition:
            if self.engine.fill:
                self.owners = choose_owners(prof, bounds, self.M, schedule, self.t.cfg.parallel.pp_frozen_tolerance)
            else:  # balanced: one module per rank, round robin by size
                order = sorted(costs, key=lambda c: -c.params)
                self.owners = {c.name: {i % self.engine.pp} for i, c in enumerate(order)}
            self.engine.offload([p.module for (name, _), g in zip(self.provides, groups) for p in g
                                 if p.module is not None and self.engine.pp_rank not in self.owners[name]])
        if not self.engine.fill:
            return
        plan = simulate(prof, bounds, self.M, schedule, "fill", owners=self.owners)
        self.placement = {slot: cs for (r, slot), cs in plan.placement.items() if r == self.engine.pp_rank}
        self.current = current_plan(prof, bounds, self.M, schedule, self.owners)

    def _split(self, batch: dict) -> list[dict]:
        """``M`` equal micro-batches. A rank slice short of dropped samples is padded by repeating its samples with
        loss weight 0, because the pipeline's p2p buffers have fixed shapes."""
        batch = {k: v for k, v in batch.items() if k != "position"}
        n = len(batch["index"])
        if n == 0:
            raise RuntimeError("a data-parallel rank received an empty batch (every sample was dropped)")
        pad = [i % n for i in range(self.per_rank)]
        out = {k: (v[pad] if isinstance(v, torch.Tensor) else [v[i] for i in pad]) for k, v in batch.items()}
        out["valid"] = torch.arange(self.per_rank) < n
        size = self.per_rank // self.M
        return [{k: v[i * size:(i + 1) * size] for k, v in out.items()} for i in range(self.M)]

    def __call__(self, batch: dict, next_batch: dict | None) -> None:
        from difftrain.parallelism.pipeline.fill import CurrentFill

        t, step, eng = self.t, self.t.step, self.engine
        mbs = self._split(batch)
        if self.placement is None:
            self._plan(mbs, step)
        preps: dict[int, dict] = {}

        def prep_of(i: int, o: dict) -> dict:  # prepare once per micro-batch (first and last segment share a rank)
            if i not in preps:
                out = self._unpack(o)
                prep = t.stage.prepare({**mbs[i], **out}, step)
                prep["valid"] = mbs[i]["valid"].to(out["x0"].device)
                preps[i] = prep
            return preps[i]

        def make_input(i: int, o: dict) -> tuple:
            x, tt, cond = t.stage.model_inputs(prep_of(i, o))
            return (x, tt, *[cond[k] for k in self.keys])

        fill = self._frozen(step + 1, self.placement) if eng.fill and next_batch is not None else None
        cur, slots, inputs, targets = None, {}, None, None
        if self.next is None and eng.fill:  # the first step (or the first after a resume): nothing was prefetched
            cur = CurrentFill(self._frozen(step), self.current, mbs, eng.pp_group, eng.p2p_group, make_input,
                              lambda i, o: self._pack(prep_of(i, o)))
            slots = cur.slots(tag=f"step{step}:")
        else:  # prefetched in the previous step's bubbles, or the balanced fallback now
            outs = (self.next if self.next is not None else
                    self._frozen(step).balanced(mbs, eng.pp_rank, eng.pp, self.owners))
            inputs = [make_input(i, o) for i, o in enumerate(outs)]
            targets = [self._pack(prep_of(i, o)) for i, o in enumerate(outs)]
        if fill is not None:
            for k, work in fill.slots(self._split(next_batch), tag=f"step{step + 1}:").items():
                slots.setdefault(k, []).extend(work)
        self.per_sample = []
        self.nan = ckpt.fault("nan_loss", step + 1)
        t0 = time.perf_counter()
        eng.pipe.step(inputs, targets, slots=slots if eng.fill else None,
                      input_fn=cur.input_fn if cur is not None and eng.pipe.has_first else None,
                      target_fn=cur.target_fn if cur is not None and eng.pipe.has_last else None)
        if cur is not None:
            cur.finish()
        eng.sync_grads()
        self.next = fill.deliver(self.M) if fill is not None else None
        t1 = time.perf_counter()
        # per-sample losses and times from the last segment (a middle segment prepared nothing in a first fill step);
        # the last M losses: the runtime's first step also runs a shape-inference forward through loss_fn
        per_t = torch.zeros(2, self.per_rank, device=t.device)
        if self.per_sample:
            per_t[0] = torch.cat(self.per_sample[-self.M:]).float()
        if len(preps) == self.M:
            per_t[1] = torch.cat([preps[i]["t"] for i in range(self.M)]).float()
        dist.broadcast(per_t, group=eng.pp_group, group_src=eng.last_owner)
        n = len(batch["index"])  # the real samples come first (``_split`` pads at the end): no boolean mask, no sync
        t.metrics.add_samples(per_t[0][:n], per_t[1][:n])
        loss = per_t[0][:n].sum()  # every pp rank has the losses: all of them agree on a skip with the dp ranks
        gnorm, ok = eng.step(step, loss)
        t.stage.after_step(step, ok)
        t.metrics.add_step(gnorm, ok, fwd_bwd=t1 - t0, optim=time.perf_counter() - t1, step=step + 1,
                           keys=batch.get("keys"), loss_ok=torch.isfinite(loss))

    def _pack(self, prep: dict) -> torch.Tensor:
        """What the stage's loss reads (``Stage.loss_keys``), batch-first, as one float tensor [B, D] (a schedule's
        target is one tensor), with the padding mask last. A ``None`` entry (no explicit weight) travels as ones."""
        b = len(prep["valid"])
        parts, layout = [], []
        for key in self.t.stage.loss_keys:
            v = prep[key]
            v = torch.ones(b, device=prep["valid"].device) if v is None else v
            layout.append((key, tuple(v.shape[1:])))
            parts.append(v.reshape(b, -1).float())
        self.layout = layout
        return torch.cat([*parts, prep["valid"].float()[:, None]], 1)

    def loss_fn(self, pred: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The micro-batch's mean loss over its real samples (padding has weight 0); the schedule averages over
        micro-batches."""
        b, at, prep = packed.shape[0], 0, {}
        for key, shape in self.layout:
            n = torch.Size(shape).numel()
            prep[key] = packed[:, at:at + n].reshape(b, *shape)
            at += n
        prep["weight"] = prep["weight"] * packed[:, at]
        if self.nan:  # test hook (DIFFTRAIN_FAULT=nan_loss:STEP:RANK), on a rank holding the loss
            pred = pred * float("nan")
        loss, per = self.t.stage.loss(pred, prep)
        self.per_sample.append(per)
        return loss
