"""The teacher in the pipeline's bubbles: a distillation step on 2 pipeline ranks whose teacher work runs inline, is
pre-computed (balanced) or fills the bubbles.

    python benchmarks/teacher_fill.py              # ~2 min on 2 idle cores
    python benchmarks/teacher_fill.py --quick      # fewer rounds (a smoke run)

``benchmarks/distill.py`` runs it too (its last line carries ``teacher_fill_speedup`` and
``teacher_fill_vs_balanced``). Two gloo processes (one thread each) train the demo-sized text-conditional DiT of
``benchmarks/pipeline.py`` (8 blocks, width 192, MiniLM captions, a small diffusers VAE, the digits) as a
progressive-distillation student: each sample's frozen work is its latents, its caption states, then its
teacher's two DDIM steps (a frozen DiT of the same size, rectified flow, two forwards per sample) on the keyed
noise and t, the chain that ``PipelinedStep.groups`` forms for ``stage=progressive`` (the teacher piece needs the
latents and the text). The student regresses the teacher's end point. M = 4 micro-batches of 8, 1F1B:

* ``inline``: each segment does its frozen work right before its forward: the first encodes (its inputs), the
  last encodes and runs the teacher (its targets), as a trainer calling the teacher in ``prepare`` does; the
  segment cut balances that extra work (``partition``'s ``segment_extra``);
* ``balanced``: both ranks run half of the chain up front, exchange, then the stock ``Schedule1F1B``;
* ``fill``: the next iteration's chain in this iteration's bubbles (``FillSchedule`` + ``FrozenFill``, placed by
  ``simulate.fill_plan`` from costs profiled here); what does not fit runs after each rank's last action.

Variants are interleaved round-robin (rotating which goes first). Printed: median step times, paired ratios with
95% confidence intervals over rounds, the simulator's prediction. Ends with one ``key=value`` line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from pipeline import MB, L, _free_port, build_model, digits_batches, loss_fn, make_vae_folder, ratio_ci  # noqa: E402

VARIANTS = ("inline", "balanced", "fill")
N_MB = 4


class Worker:
    def __init__(self, rank: int, world: int, vae_dir: str, rounds: int):
        import torch.distributed as dist

        from difftrain.models.encoders import VAE, TextEncoder
        from difftrain.parallelism.pipeline.fill import FrozenModule

        self.dist, self.rank, self.world, self.rounds = dist, rank, world, rounds
        self.text = TextEncoder.from_pretrained("minilm", max_length=L)
        self.vae = VAE.from_pretrained(vae_dir)
        torch.manual_seed(1)
        self.teacher = build_model().requires_grad_(False).eval()
        self.chain = FrozenModule("latents+text+teacher", self._chain)
        self.pixels, self.captions = digits_batches(N_MB * MB * (rounds + 3))
        self.cursor = self.count = 0

    def next_batch(self) -> list[dict]:
        lo, n = self.cursor, N_MB * MB
        self.cursor = (self.cursor + n) % (len(self.captions) - n)
        index = torch.arange(self.count, self.count + n)
        self.count += n
        return [{"pixels": self.pixels[lo + i * MB: lo + (i + 1) * MB], "index": index[i * MB:(i + 1) * MB],
                 "captions": self.captions[lo + i * MB: lo + (i + 1) * MB]} for i in range(N_MB)]

    @staticmethod
    def start(x0, index):
        """x_t and t keyed per sample (a slice of a micro-batch draws what the whole one draws for it)."""
        from difftrain.diffusion.keyed import keyed_rand, keyed_randn

        eps = keyed_randn(0, 0, index, x0.shape[1:], "noise")
        t = keyed_rand(0, 0, index, "t")
        tt = t.view(-1, 1, 1, 1)
        return (1 - tt) * x0 + tt * eps, t

    def encode(self, mb: dict) -> tuple:
        return (self.vae.encode(mb["pixels"]), *self.text.encode(list(mb["captions"])))

    def _chain(self, mb: dict) -> tuple:
        """The chain: latents, caption states, then the teacher's two DDIM (Euler) steps t -> t/2 -> 0."""
        x0, st, mk = self.encode(mb)
        x, t = self.start(x0, mb["index"])
        cond = {"text_states": st, "text_mask": mk}
        for a, b in ((t, t / 2), (t / 2, torch.zeros_like(t))):
            x = x - (a - b).view(-1, 1, 1, 1) * self.teacher(x, a, cond)
        return x0, st, mk, x

    def io(self, outs: list[dict], mbs: list[dict]):
        """The first segment's inputs and the last one's targets from the chain's outputs (``{name: tuple}``)."""
        inputs, targets = [], []
        for o, mb in zip(outs, mbs):
            x0, st, mk, z = o[self.chain.name]
            x_t, t = self.start(x0, mb["index"])
            inputs.append((x_t, t, st, mk))
            targets.append(z)
        return inputs, targets

    def profile(self):
        from difftrain.parallelism.pipeline.costs import Profile, profile_blocks, profile_frozen

        mb = self.next_batch()[0]
        with torch.no_grad():
            outs = self._chain(mb)
        inputs, _ = self.io([{self.chain.name: outs}], [mb])
        blocks = profile_blocks(build_model(), inputs[0], "wall", reps=5)
        params = sum(p.numel() for m in (self.vae, self.text, self.teacher) for p in m.parameters())
        chain = profile_frozen(self.chain.name, lambda: self._chain(mb), "wall", reps=3, params=params)
        one = profile_frozen(self.chain.name, lambda: self._chain({k: v[:1] for k, v in mb.items()}), "wall", reps=3)
        chain.fixed = max(0.0, (MB * one.fwd - chain.fwd) / (MB - 1))  # the affine cost's intercept (a call's own)
        enc = profile_frozen("encoders", lambda: self.encode(mb), "wall", reps=3)
        box = [(Profile(blocks, [chain], MB), enc.fwd)]
        self.dist.broadcast_object_list(box, src=0)  # both ranks plan with rank 0's measurement
        return box[0]

    def setup(self, prof, enc: float):
        from difftrain.parallelism.pipeline.fill import FrozenFill
        from difftrain.parallelism.pipeline.partition import partition
        from difftrain.parallelism.pipeline.runtime import build_pipeline
        from difftrain.parallelism.pipeline.simulate import simulate

        times = [b.fwd + b.bwd for b in prof.blocks]
        group, cpu = self.dist.group.WORLD, torch.device("cpu")
        bounds_inline = partition(times, 2, segment_extra=[enc, prof.frozen_time])
        bounds = partition(times, 2)
        plan = simulate(prof, bounds, N_MB, "1f1b", "fill")
        mine = {slot: cs for (r, slot), cs in plan.placement.items() if r == self.rank}
        v = {"inline": dict(pipe=build_pipeline(build_model(), bounds_inline, "1f1b", N_MB, loss_fn, group, cpu,
                                                fill=True), bounds=bounds_inline),
             "balanced": dict(pipe=build_pipeline(build_model(), bounds, "1f1b", N_MB, loss_fn, group, cpu),
                              bounds=bounds, frozen=FrozenFill([self.chain], {}, group)),
             "fill": dict(pipe=build_pipeline(build_model(), bounds, "1f1b", N_MB, loss_fn, group, cpu, fill=True),
                          bounds=bounds, frozen=FrozenFill([self.chain], mine, group))}
        for d in v.values():
            d["opt"] = torch.optim.AdamW([p for _, p in d["pipe"].named_parameters()], lr=1e-4)
        v["fill"]["next_mbs"] = self.next_batch()
        v["fill"]["next"] = v["fill"]["frozen"].run_all(v["fill"]["next_mbs"])  # iteration 0: nothing prefetched
        return v

    def step(self, name: str, d: dict) -> float:
        self.dist.barrier()
        t0 = time.perf_counter()
        pipe = d["pipe"]
        if name == "inline":
            mbs = self.next_batch()

            def first(i):  # the first segment encodes right before its forward
                with torch.no_grad():
                    x0, st, mk = self.encode(mbs[i])
                return (*self.start(x0, mbs[i]["index"]), st, mk)

            def target(i):  # the last segment encodes and runs the teacher right before its forward
                with torch.no_grad():
                    return self._chain(mbs[i])[3]

            pipe.step(None, None, input_fn=first if pipe.has_first else None,
                      target_fn=target if pipe.has_last else None)
        elif name == "balanced":
            mbs = self.next_batch()
            pipe.step(*self.io(d["frozen"].balanced(mbs, self.rank, self.world), mbs))
        else:
            inputs, targets = self.io(d["next"], d["next_mbs"])
            d["next_mbs"] = self.next_batch()
            pipe.step(inputs, targets, slots=d["frozen"].slots(d["next_mbs"], tag="next:"))
            d["next"] = d["frozen"].deliver(N_MB)
        d["opt"].step()
        d["opt"].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def run(self) -> dict:
        prof, enc = self.profile()
        v = self.setup(prof, enc)
        res = {name: [] for name in VARIANTS}
        for rnd in range(self.rounds + 1):  # round 0 warms up (shape inference, allocator)
            k = rnd % len(VARIANTS)
            for name in VARIANTS[k:] + VARIANTS[:k]:
                dt = self.step(name, v[name])
                if rnd:
                    res[name].append(dt)
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, res)
        return dict(prof=prof, enc=enc, ranks=gathered, bounds={n: v[n]["bounds"] for n in VARIANTS})


def _worker(rank, world, port, vae_dir, rounds, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = Worker(rank, world, vae_dir, rounds).run()
    if rank == 0:
        queue.put(res)
    dist.barrier()
    dist.destroy_process_group()


def measure(rounds: int) -> dict:
    """Run the two ranks; print the tables; return the figures (``teacher_fill_*``)."""
    import torch.multiprocessing as mp

    from difftrain.parallelism.pipeline.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        make_vae_folder(tmp)
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_worker, args=(2, _free_port(), tmp, rounds, queue), nprocs=2, start_method="spawn")
        r = queue.get()
    prof = r["prof"]
    times = {n: [max(rk[n][j] for rk in r["ranks"]) for j in range(rounds)] for n in VARIANTS}  # the slower rank
    med = {n: statistics.median(ts) for n, ts in times.items()}
    teacher = prof.frozen_time - r["enc"]
    print(f"## teacher in the bubbles: 2 gloo ranks x 1 thread, 1F1B, M = {N_MB} micro-batches of {MB}, "
          f"{rounds} rounds\nper micro-batch: student fwd+bwd {prof.backbone_time * 1e3:.0f} ms, encoders "
          f"{r['enc'] * 1e3:.0f} ms, teacher's two steps {teacher * 1e3:.0f} ms "
          f"({100 * teacher / prof.backbone_time:.0f}% of the student); the chain's fixed cost per call "
          f"{prof.frozen[0].fixed * 1e3:.0f} ms\n")
    print("| variant | step ms (median) | simulated ms | segment cut |")
    print("|---|---|---|---|")
    for n in VARIANTS:
        mode = "inline" if n == "inline" else n
        sim = simulate(prof, r["bounds"][n], N_MB, "1f1b", mode) if n != "inline" else None
        print(f"| {n} | {med[n] * 1e3:.0f} | {sim.time * 1e3:.0f} | {r['bounds'][n]} |" if sim else
              f"| {n} | {med[n] * 1e3:.0f} | - | {r['bounds'][n]} |")
    figures = {}
    print("\n| ratio (paired over rounds) | mean | 95% CI |\n|---|---|---|")
    for num, key in (("inline", "teacher_fill_speedup"), ("balanced", "teacher_fill_vs_balanced")):
        m, lo, hi = ratio_ci(times[num], times["fill"])
        print(f"| {num} / fill | {m:.3f} | [{lo:.3f}, {hi:.3f}] |")
        figures.update({key: round(m, 3), f"{key}_lo": round(lo, 3), f"{key}_hi": round(hi, 3)})
    print()
    figures.update({f"teacher_{n}_ms": round(med[n] * 1e3, 1) for n in VARIANTS})
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    a = ap.parse_args()
    wall0 = time.time()
    figures = measure(a.rounds or (3 if a.quick else 16))
    figures["wall_s"] = round(time.time() - wall0)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
