"""DiffusionPipe on this machine: pipeline training with the frozen work inline, pre-computed, or in the bubbles.

    python benchmarks/pipeline.py              # ~3 min on 2 idle cores (wall_s=153)
    python benchmarks/pipeline.py --quick      # fewer rounds (a smoke run)

Two gloo processes (spawned here, one thread each) train a demo-sized text-conditional DiT (8 blocks, width 192,
64 tokens of 4x16x16 latents) whose frozen work is the real MiniLM text encoder (24 tokens) and a small randomly
initialised diffusers VAE loaded through ``VAE.from_pretrained`` (3x32x32 digits -> 4x16x16), on the scikit-learn
digits with "a handwritten digit N" captions. Global batch = M micro-batches of 8, M = 4 and 8. Variants, all in
the same two processes, interleaved round-robin (rotating which goes first) because this machine's speed drifts:

* ``dp``: DDP over the 2 ranks, each encoding its half batch inline, M/2 accumulated micro-batches;
* ``inline``: 1F1B over 2 segments, the first segment encodes each micro-batch right before its forward;
* ``balanced``: the public-API fallback: both ranks encode half of the batch up front, exchange, then the stock
  ``Schedule1F1B``;
* ``fill``: 1F1B with the next iteration's frozen work in the bubbles (``FillSchedule`` + ``FrozenFill``),
  placed by ``simulate.fill_plan`` from costs profiled here.

Every step includes AdamW. Printed: median step times, paired ratios with 95% confidence intervals (t on log
ratios over rounds), measured idle per rank (waits in the schedule / step), per-rank memory (parameters,
optimizer, activations, frozen encoders), and the simulator's prediction and ideal bound next to each; the
simulator's one constant (per-action overhead) is calibrated on the M = 4 ``balanced`` run and checked on M = 8.
Writes docs/pipeline_timeline.png (measured and simulated iteration per rank). Ends with one ``key=value`` line.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MB, L, WIDTH, DEPTH = 8, 24, 192, 8
VARIANTS = ("dp", "inline", "balanced", "fill")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_vae_folder(path: str) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=2).save_pretrained(path)


def digits_batches(n_samples: int):
    """(pixels [N, 3, 32, 32] in [-1, 1], captions) from the scikit-learn digits."""
    import numpy as np

    from difftrain.data.demo import digit_arrays, upsample

    images, labels, _ = digit_arrays()
    idx = np.arange(n_samples) % len(labels)
    px = np.stack([upsample(images[i], 32) for i in idx]).astype("float32") / 127.5 - 1
    pixels = torch.from_numpy(px)[:, None].repeat(1, 3, 1, 1)
    return pixels, [f"a handwritten digit {int(labels[i])}" for i in idx]


def build_model():
    from difftrain.config import ModelConfig
    from difftrain.models import registry

    mcfg = ModelConfig(name="DiT-T/2", image_size=16, in_channels=4, cond="text",
                       args={"depth": DEPTH, "hidden_size": WIDTH, "num_heads": 4})
    arch, acfg = registry.arch_config(mcfg, text_dim=384)
    return registry.materialize(registry.build(arch, acfg), "cpu", seed=0)


def loss_fn(pred, target):
    return (pred - target).square().mean()


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class Worker:
    def __init__(self, rank: int, world: int, vae_dir: str, rounds: int, ms: list[int]):
        import torch.distributed as dist

        from difftrain.models.encoders import VAE, TextEncoder
        from difftrain.parallelism.pipeline.fill import FrozenModule

        self.dist, self.rank, self.world, self.rounds, self.ms = dist, rank, world, rounds, ms
        self.text = TextEncoder.from_pretrained("minilm", max_length=L)
        self.vae = VAE.from_pretrained(vae_dir)
        self.frozen = [FrozenModule("vae", lambda mb: (self.vae.encode(mb["pixels"]),)),
                       FrozenModule("text", lambda mb: self.text.encode(list(mb["captions"])))]
        self.pixels, self.captions = digits_batches(max(ms) * MB * (rounds + 3))
        self.cursor = 0

    def next_batch(self, n_mb: int) -> list[dict]:
        lo = self.cursor
        self.cursor = (self.cursor + n_mb * MB) % (len(self.captions) - n_mb * MB)
        return [{"pixels": self.pixels[lo + i * MB: lo + (i + 1) * MB],
                 "captions": self.captions[lo + i * MB: lo + (i + 1) * MB]} for i in range(n_mb)]

    @staticmethod
    def noise(step: int, i: int):
        g = torch.Generator().manual_seed(1000 * step + i)
        return torch.randn(MB, 4, 16, 16, generator=g), torch.rand(MB, generator=g)

    def inputs_from(self, outs: list[dict], step: int, first: int = 0):
        """Rectified-flow x_t from the frozen outputs and keyed noise; the target is the noise (eps prediction),
        so the last segment needs no frozen output in any variant."""
        inputs, targets = [], []
        for i, o in enumerate(outs):
            x0 = o["vae"][0]
            eps, t = self.noise(step, first + i)
            tt = t.view(-1, 1, 1, 1)
            inputs.append(((1 - tt) * x0 + tt * eps, t, *o["text"]))
            targets.append(eps)
        return inputs, targets

    # ------------------------------------------------------------------ profiling
    def profile(self, n_mb: int):
        from difftrain.parallelism.pipeline.costs import Profile, profile_blocks, profile_frozen
        from difftrain.parallelism.pipeline.fill import FrozenFill

        mbs = self.next_batch(1)
        outs = FrozenFill(self.frozen, {}).run_all(mbs)
        inputs, _ = self.inputs_from(outs, 0)
        blocks = profile_blocks(build_model(), inputs[0], "wall", reps=5)
        frozen = [profile_frozen(m.name, lambda m=m: m.fn(mbs[0]), "wall", reps=5,
                                 params=sum(p.numel() for p in (self.vae if m.name == "vae" else self.text).parameters()))
                  for m in self.frozen]
        prof = Profile(blocks, frozen, MB)
        # both ranks plan with rank 0's measurement
        box = [prof]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ variants
    def setup(self, prof, n_mb: int):
        from difftrain.parallelism.pipeline.fill import FrozenFill
        from difftrain.parallelism.pipeline.partition import partition
        from difftrain.parallelism.pipeline.runtime import build_pipeline
        from difftrain.parallelism.pipeline.simulate import simulate

        times = [b.fwd + b.bwd for b in prof.blocks]
        bounds_inline = partition(times, 2, segment_extra=[prof.frozen_time, 0.0])
        bounds = partition(times, 2)
        group = self.dist.group.WORLD
        v = {}
        pipe = build_pipeline(build_model(), bounds_inline, "1f1b", n_mb, loss_fn, group, torch.device("cpu"),
                              fill=True)
        v["inline"] = dict(pipe=pipe, bounds=bounds_inline)
        pipe = build_pipeline(build_model(), bounds, "1f1b", n_mb, loss_fn, group, torch.device("cpu"))
        v["balanced"] = dict(pipe=pipe, bounds=bounds, frozen=FrozenFill(self.frozen, {}, group))
        plan = simulate(prof, bounds, n_mb, "1f1b", "fill")
        mine = {slot: cs for (r, slot), cs in plan.placement.items() if r == self.rank}
        pipe = build_pipeline(build_model(), bounds, "1f1b", n_mb, loss_fn, group, torch.device("cpu"), fill=True)
        v["fill"] = dict(pipe=pipe, bounds=bounds, frozen=FrozenFill(self.frozen, mine, group))
        from torch.nn.parallel import DistributedDataParallel as DDP

        v["dp"] = dict(ddp=DDP(build_model()))
        for name, d in v.items():
            params = list(d["ddp"].parameters()) if name == "dp" else list(d["pipe"].named_parameters())
            params = [p[1] if isinstance(p, tuple) else p for p in params]
            d["opt"] = torch.optim.AdamW(params, lr=1e-4)
            d["params"] = params
        v["fill"]["next"] = v["fill"]["frozen"].run_all(self.next_batch(n_mb))  # iteration 0: nothing prefetched
        return v

    def step(self, name: str, d: dict, n_mb: int, it: int) -> dict:
        """One timed training step; returns its time and waits (idle) as seen by this rank."""
        dist = self.dist
        dist.barrier()
        t0 = time.perf_counter()
        info = {}
        if name == "dp":
            mine = self.next_batch(n_mb)[self.rank::self.world]
            with torch.no_grad():
                outs = [{m.name: tuple(m.fn(mb)) for m in self.frozen} for mb in mine]
            inputs, targets = self.inputs_from(outs, it, first=self.rank * len(mine))
            ddp = d["ddp"]
            for j, ((x_t, t, st, mk), tg) in enumerate(zip(inputs, targets)):
                ctx = ddp.no_sync() if j < len(inputs) - 1 else _null()
                with ctx:
                    (loss_fn(ddp(x_t, t, {"text_states": st, "text_mask": mk}), tg) / len(inputs)).backward()
        elif name == "inline":
            mbs = self.next_batch(n_mb)
            pipe = d["pipe"]

            def first_inputs(i):  # the first segment encodes micro-batch i right before its forward
                with torch.no_grad():
                    out = {m.name: tuple(m.fn(mbs[i])) for m in self.frozen}
                return self.inputs_from([out], it, first=i)[0][0]

            targets = [self.noise(it, i)[0] for i in range(n_mb)] if pipe.has_last else None
            pipe.step(None, targets, input_fn=first_inputs if pipe.has_first else None)
            info["trace"] = pipe.schedule.trace
        elif name == "balanced":
            mbs = self.next_batch(n_mb)
            outs = d["frozen"].balanced(mbs, self.rank, self.world)
            inputs, targets = self.inputs_from(outs, it)
            d["pipe"].step(inputs, targets)
        else:  # fill
            inputs, targets = self.inputs_from(d["next"], it)
            slots = d["frozen"].slots(self.next_batch(n_mb), tag="next:")
            d["pipe"].step(inputs, targets, slots=slots)
            d["next"] = d["frozen"].deliver(n_mb)
            info["trace"] = d["pipe"].schedule.trace
        d["opt"].step()
        d["opt"].zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        info.update(time=t1 - t0, t0=t0)
        if "trace" in info:
            info["wait"] = sum(e[3] - e[2] for e in info["trace"] if e[0] == "wait")
        return info

    def memory(self, name: str, d: dict, prof, n_mb: int) -> dict:
        """Per-rank bytes: parameters, AdamW state (+ gradients), saved activations of the micro-batches in flight
        (profiled per block), frozen encoders held."""
        frozen_params = {f.name: f.params * 4 for f in prof.frozen}
        params = _bytes(d["params"])
        if name == "dp":
            acts = sum(b.saved_bytes for b in prof.blocks)
            frozen = sum(frozen_params.values())
        else:
            lo, hi = d["bounds"][self.rank]
            acts = min(2 - self.rank, n_mb) * sum(b.saved_bytes for b in prof.blocks[lo:hi])
            if name == "inline":
                frozen = sum(frozen_params.values()) if self.rank == 0 else 0
            elif name == "balanced":
                frozen = sum(frozen_params.values())
            else:
                names = {c.name for cs in d["frozen"].placement.values() for c in cs}
                frozen = sum(v for k, v in frozen_params.items() if k in names)
        return dict(params=params, optimizer=3 * params, activations=acts, frozen=frozen)

    def run(self) -> dict:
        out = {}
        for n_mb in self.ms:
            prof = self.profile(n_mb)
            v = self.setup(prof, n_mb)
            order = list(VARIANTS)
            res = {name: [] for name in order}
            for rnd in range(self.rounds + 1):  # round 0 warms up (shape inference, allocator)
                k = rnd % len(order)
                for name in order[k:] + order[:k]:
                    info = self.step(name, v[name], n_mb, rnd)
                    if rnd:
                        res[name].append(info)
            gathered = [None] * self.world
            mem = {name: self.memory(name, v[name], prof, n_mb) for name in order}
            mine = {name: [dict(time=i["time"], wait=i.get("wait"), t0=i["t0"],
                                trace=i.get("trace") if j == len(res[name]) - 1 else None)
                           for j, i in enumerate(res[name])] for name in order}
            self.dist.all_gather_object(gathered, dict(res=mine, mem=mem))
            out[n_mb] = dict(prof=prof, ranks=gathered, bounds={n: v[n].get("bounds") for n in order})
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _worker(rank, world, port, vae_dir, rounds, ms, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w = Worker(rank, world, vae_dir, rounds, ms)
    # gloo all-reduce bandwidth for the simulator's data-parallel sync (fp32 gradients of the whole model)
    grads = torch.zeros(sum(p.numel() for p in build_model().parameters()))
    dist.all_reduce(grads)
    t = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(grads)
    ar = (time.perf_counter() - t) / 5
    res = w.run()
    if rank == 0:
        queue.put(dict(res=res, allreduce_s=ar, grad_numel=grads.numel()))
    dist.barrier()
    dist.destroy_process_group()


def ratio_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Paired ratio a/b over rounds: geometric mean and 95% t-interval of the log ratios."""
    from scipy.stats import t as student

    logs = [math.log(x / y) for x, y in zip(a, b)]
    m = statistics.mean(logs)
    half = student.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    a = ap.parse_args()
    rounds = a.rounds or (3 if a.quick else 12)
    ms = [4, 8]
    import torch.multiprocessing as mp

    from difftrain.parallelism.pipeline.simulate import Event, plot_timeline, simulate, simulate_dp

    wall0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        make_vae_folder(tmp)
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_worker, args=(2, _free_port(), tmp, rounds, ms, queue), nprocs=2, start_method="spawn")
        got = queue.get()
    res, ar_s = got["res"], got["allreduce_s"]
    dp_bw = 2 * 4 * got["grad_numel"] * 0.5 / ar_s  # ring volume 2 (D-1)/D of fp32 gradients, D = 2
    print(f"torch {torch.__version__}, 2 gloo ranks x 1 thread, {rounds} rounds per variant, micro-batch {MB}\n")
    figures = {}
    overhead = 0.0
    for n_mb in ms:
        r = res[n_mb]
        prof = r["prof"]
        ranks = r["ranks"]
        # step time of a round = the slower rank's
        times = {name: [max(rk["res"][name][j]["time"] for rk in ranks) for j in range(rounds)] for name in VARIANTS}
        med = {name: statistics.median(ts) for name, ts in times.items()}
        bb = prof.backbone_time
        print(f"## M = {n_mb} (global batch {n_mb * MB}); per micro-batch: backbone fwd+bwd {bb * 1e3:.0f} ms, "
              f"frozen {prof.frozen_time * 1e3:.0f} ms ({100 * prof.frozen_time / bb:.0f}% of the backbone: "
              + ", ".join(f"{f.name} {f.fwd * 1e3:.0f} ms" for f in prof.frozen) + ")\n")
        opt_s = 0.0  # optimizer time is inside every measured step; the simulator adds it from the DP baseline
        sims = {}
        base = {"inline": "inline", "balanced": "balanced", "fill": "fill"}
        if n_mb == ms[0]:  # calibrate the per-action overhead on the balanced run (the only fitted constant)
            prof.overhead = 0.0
            s0 = simulate(prof, r["bounds"]["balanced"], n_mb, "1f1b", "balanced")
            overhead = max(0.0, (med["balanced"] - s0.time) / (2 * (n_mb + 1)))
        prof.overhead = overhead
        for name, mode in base.items():
            sims[name] = simulate(prof, r["bounds"][name], n_mb, "1f1b", mode)
        sims["dp"] = simulate_dp(prof, n_mb // 2, 2, dp_bw, grad_bytes=4)
        print("| variant | step ms (median) | simulated ms | ideal ms | sim error | idle rank 0 | idle rank 1 |")
        print("|---|---|---|---|---|---|---|")
        for name in VARIANTS:
            idle = []
            for rk in ranks:
                rows = rk["res"][name]
                if rows[0]["wait"] is None:
                    idle.append("-")
                else:
                    idle.append(f"{100 * statistics.median(x['wait'] / t for x, t in zip(rows, times[name])):.1f}%")
            sim = sims[name]
            err = (sim.time + opt_s - med[name]) / med[name]
            print(f"| {name} | {med[name] * 1e3:.0f} | {sim.time * 1e3:.0f} | {sim.ideal * 1e3:.0f} | {100 * err:+.1f}% | "
                  f"{idle[0]} | {idle[1]} |")
            figures[f"ms_{name}_M{n_mb}"] = round(med[name] * 1e3, 1)
            figures[f"sim_err_{name}_M{n_mb}"] = round(100 * err, 1)
            for q, v in enumerate(idle):
                if v != "-":
                    figures[f"idle_{name}_r{q}_M{n_mb}"] = float(v[:-1])
        print()
        print("| ratio (paired over rounds) | mean | 95% CI |")
        print("|---|---|---|")
        for num, den in (("inline", "fill"), ("balanced", "fill"), ("dp", "fill"), ("inline", "balanced")):
            m, lo, hi = ratio_ci(times[num], times[den])
            print(f"| {num} / {den} (speedup of {den}) | {m:.3f} | [{lo:.3f}, {hi:.3f}] |")
            figures[f"speedup_{den}_vs_{num}_M{n_mb}"] = round(m, 3)
            figures[f"speedup_{den}_vs_{num}_M{n_mb}_lo"] = round(lo, 3)
            figures[f"speedup_{den}_vs_{num}_M{n_mb}_hi"] = round(hi, 3)
        print()
        print("| variant | rank | parameters MB | optimizer + grads MB | activations MB | frozen encoders MB |")
        print("|---|---|---|---|---|---|")
        for name in VARIANTS:
            for q, rk in enumerate(ranks):
                mm = rk["mem"][name]
                print(f"| {name} | {q} | {mm['params'] / 2**20:.1f} | {mm['optimizer'] / 2**20:.1f} | "
                      f"{mm['activations'] / 2**20:.1f} | {mm['frozen'] / 2**20:.1f} |")
        print()
        if n_mb == ms[0]:  # timeline of one measured fill iteration and its simulation
            events = []
            for q, rk in enumerate(ranks):
                row = rk["res"]["fill"][-1]
                for kind, label, t0, t1 in row["trace"]:
                    if kind != "wait":
                        events.append(Event(q, kind, t0 - row["t0"], t1 - row["t0"],
                                            int(label) if kind in ("F", "B") else -1, label))
            shift = min(e.start for e in events)
            for e in events:
                e.start, e.end = e.start - shift, e.end - shift
            out = ROOT / "docs" / "pipeline_timeline.png"
            plot_timeline(events, str(out), f"measured: 1F1B + bubble filling, M = {n_mb}, 2 CPU ranks", 2)
            plot_timeline(sims["fill"], str(out.with_name("pipeline_timeline_sim.png")),
                          f"simulated: 1F1B + bubble filling, M = {n_mb}")
            print(f"timelines: {out}, {out.with_name('pipeline_timeline_sim.png')}\n")
    figures["speedup_fill_vs_inline"] = figures[f"speedup_fill_vs_inline_M{ms[0]}"]
    figures["speedup_fill_vs_balanced"] = figures[f"speedup_fill_vs_balanced_M{ms[0]}"]
    figures["overhead_ms"] = round(overhead * 1e3, 2)
    figures["wall_s"] = round(time.time() - wall0)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
