"""Training throughput on CPU: (1) our Trainer vs a bare PyTorch loop, (2) our DiT vs diffusers' DiT.

    python benchmarks/train_throughput.py            # full, about 8 min on 2 idle cores
    python benchmarks/train_throughput.py --quick    # smoke run, about 1 min (dits2 at batch 4)

Two cases, batch 64, fp32, ``torch.set_num_threads(2)``:

* ``demo``:  ``configs/demo.yaml`` as is: DiT-T/2, 16 px, 1 channel, text-conditional with the packaged
  MiniLM, on the scikit-learn digits written by ``write_digits`` (16 px).
* ``dits2``: DiT-S/2, 32 px, 3 channels, class-conditional (10 digit labels, null label 10), on the digits
  written at 32 px; ``data.channels=3`` makes the loader convert them to RGB, so the model sees 3 channels.
  Diffusion and optimizer settings are the demo's.

**1. Trainer overhead.** One ``Trainer(cfg).fit()``: a gloo process group of 1, the DDP engine, the real
``ShardLoader`` with 1 worker process, caption dropout and per-sample keyed RNG, grad clipping, fused AdamW with
the non-finite skip and the LR table, EMA, metrics reduced and written to tensorboard every 10 steps (the tqdm bar is off:
``run.progress=false``), checkpoints only at the end (``run.ckpt_every=0``), no sample grids. After ``warmup``
steps an ``on_step_end`` callback interleaves a bare loop: it runs ``block`` bare steps, and again after every
``block`` trainer steps (B T B T ... B); each trainer block is compared with the mean of the two bare slots
around it, so a linear drift of the machine cancels. A trainer block's time is the wall time from the
callback's return to its next entry, which is everything ``fit()`` does for those steps: the data wait
(``LookAhead``), ``train_step`` (frozen encoders, keyed RNG, forward, loss, backward, DDP all-reduce, clip,
AdamW, LR, EMA, metrics), the log step and the stop agreement. The final checkpoint comes after the last block
and is not timed. During a bare block the loader worker only finishes the batch it had started (its queue is
then full), so at most one batch decode per block lands in the bare time.

Two bare loops, each a second copy of the model with the same init (same seed), no DDP,
``torch.optim.AdamW`` with the same hyper-parameters (foreach), ``x_t = (1-t) x0 + t eps`` with
``torch.rand``/``torch.randn``, ``model(x_t, t, cond)``, MSE, backward, step, ``zero_grad``; each bare slot runs
``block`` steps of both, in alternating order. **bare-loader** (the baseline of ``overhead_pct``) does the same
job as the trainer the way a plain script would: it reads the same shards through the same ``ShardLoader``
with 1 worker process and encodes every batch's captions with MiniLM. **bare-preloaded** is the strict
bound: 4 real batches held in memory, conditions encoded once (``overhead_vs_preloaded_pct``; on 2 cores it
also counts the trainer's loader worker competing with the step for the cores).
``overhead_pct = 100 * (bare_rate / ours_rate - 1)``, from the median over blocks of t_trainer / t_bare.
A breakdown times the trainer's extra per-step pieces on their own (medians) to say where overhead comes from;
``pieces_pct`` = 100 * (the in-process pieces: all but the worker's decoding) / bare step. A DiT-S/2 step takes
~20 s on 2 cores and varies by ~10% from step to step, so the few blocks that fit cannot resolve a few percent:
for ``dits2`` read ``dits2_pieces_pct`` (it leaves out DDP's bucket copies, small next to the step) beside
``dits2_overhead_pct``.

**2. Our DiT vs diffusers.** Our class-conditional DiT of the case's size (for ``demo`` class-conditional too,
since ``DiTTransformer2DModel`` is) and ``DiTTransformer2DModel(**diffusers_target(cfg)[1])`` carrying the same
weights (``convert_state_dict``; the eval-mode outputs are checked to agree). Both run in train mode, where
diffusers also drops class labels at random (its built-in ``class_dropout_prob=0.1``, a negligible cost).
Forward-only = ``torch.no_grad()`` forward, timed first; train step = forward, MSE, backward, AdamW(foreach)
step, ``zero_grad``. Each repeat times ``k`` steps of each model, in alternating order (AB BA AB ...);
``ours_vs_diffusers`` = median over repeats of t_diffusers / t_ours (= our steps/s over theirs; > 1: ours
faster).

Progress goes to stderr; stdout gets the tables and, last, one line of ``key=value`` figures.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from difftrain.data.images import to_unit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo.yaml"


@dataclass
class Plan:
    """Step counts for one case."""
    batch: int
    warmup: int  # untimed trainer steps before the first block; the bare loop gets warmup_bare
    warmup_bare: int
    block: int  # steps per timed block, trainer and bare alike
    blocks: int
    repeats: int  # part 2: repeats of (ours, diffusers) in alternating order
    fwd_warmup: int  # part 2: untimed forward-only steps per model (run first; they warm up train steps too)
    fwd_k: int  # forward-only steps per model per repeat
    train_warmup: int
    train_k: int  # train steps per model per repeat


# DiT-S/2 at batch 64 takes ~20 s a train step on 2 cores, so its counts are the least that still interleave.
# The trainer needs 2 warm-up steps: its step 2 was slow once (DDP rebuilds its buckets on step 2).
PLANS = {
    "full": {"demo": Plan(64, 10, 5, 10, 6, 5, 2, 10, 2, 5), "dits2": Plan(64, 2, 0, 1, 3, 3, 1, 1, 0, 1)},
    "quick": {"demo": Plan(64, 3, 2, 5, 2, 2, 1, 3, 1, 2), "dits2": Plan(4, 2, 0, 1, 2, 2, 1, 1, 0, 1)},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(xs) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------ configs
def case_config(case: str, data: dict, run_dir: Path, plan: Plan):
    from difftrain.config_checks import load_config

    steps = plan.warmup + plan.block * plan.blocks
    common = [f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every=10", "run.ckpt_every=0",
              "run.sample_every=0", "run.progress=false", "run.device=cpu", f"data.batch_size={plan.batch}",
              "data.num_workers=1", "parallel.engine=ddp"]
    if case == "demo":
        return load_config(DEMO_YAML, [f"data.train={data[16]}", *common])
    return load_config(DEMO_YAML, [
        f"data.train={data[32]}", "data.channels=3", "data.image_size=32",
        "model.name=DiT-S/2", "model.image_size=32", "model.in_channels=3", "model.cond=class",
        "model.num_classes=10", "encoders.text=", *common])


# ------------------------------------------------------------------------------------------------ part 1
class BareLoop:
    """The plain-PyTorch baseline: same init, no DDP, AdamW, MSE. ``feed="preloaded"``: 4 real batches held
    in memory (conditions encoded once), the strictest baseline. ``feed="loader"``: what a plain script that
    does the same job does: it reads the same shards through the same ``ShardLoader`` with 1 worker process
    and encodes each batch's captions with the frozen MiniLM every step."""

    def __init__(self, cfg, trainer, feed: str):
        from difftrain.data.loader import ShardLoader
        from difftrain.train.build import build_backbone

        self.feed, self.conditioner = feed, trainer.conditioner
        self.model = build_backbone(trainer.arch, trainer.acfg, trainer.device, cfg.run.seed)  # same seed = same init
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, foreach=True)
        loader = ShardLoader(cfg.data.train, cfg.data.batch_size, num_workers=1 if feed == "loader" else 0,
                             seed=cfg.run.seed + 1, channels=cfg.data.channels, image_size=cfg.data.image_size)
        self.batches = []
        if feed == "loader":
            self.it = iter(loader)
            return
        for batch in loader:
            self.batches.append((to_unit(batch["pixels"]), self.encode(batch)))
            if len(self.batches) == 4:
                break
        self.i = 0

    def encode(self, batch):
        with torch.no_grad():
            return self.conditioner(batch["captions"], batch["labels"], None)

    def next_batch(self):
        if self.feed == "loader":
            batch = next(self.it)
            return to_unit(batch["pixels"]), self.encode(batch)
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def step(self) -> None:
        x0, cond = self.next_batch()
        t = torch.rand(x0.shape[0])
        eps = torch.randn_like(x0)
        tb = t[:, None, None, None]
        x_t = (1 - tb) * x0 + tb * eps
        loss = F.mse_loss(self.model(x_t, t, cond), eps - x0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        return time.perf_counter() - t0


FEEDS = ("loader", "preloaded")


class Interleave:
    """``on_step_end`` callback: after warm-up a timed bare slot, then after every ``block`` trainer steps
    another (B T B T ... B: each trainer block sits between two bare slots). A bare slot runs ``block`` steps
    of each bare feed, in alternating order from slot to slot."""

    def __init__(self, case: str, plan: Plan, bares: dict[str, BareLoop]):
        self.case, self.plan, self.bares = case, plan, bares
        self.trainer_s: list[float] = []
        self.bare_s: dict[str, list[float]] = {f: [] for f in bares}
        self.mark = None

    def bare_slot(self) -> None:
        order = list(self.bares) if len(self.trainer_s) % 2 == 0 else list(self.bares)[::-1]
        for f in order:
            self.bare_s[f].append(self.bares[f].run(self.plan.block))

    def on_step_end(self, trainer, step: int) -> None:
        now = time.perf_counter()
        p = self.plan
        if step == p.warmup:
            for b in self.bares.values():
                b.run(p.warmup_bare)
            self.bare_slot()
        elif step > p.warmup and (step - p.warmup) % p.block == 0:
            self.trainer_s.append(now - self.mark)
            self.bare_slot()
            j = len(self.trainer_s)
            bare = ", ".join(f"bare-{f} {v[-1] / p.block * 1e3:.0f}" for f, v in self.bare_s.items())
            log(f"[{self.case}] block {j}/{p.blocks}: trainer {self.trainer_s[-1] / p.block * 1e3:.0f} ms/step, "
                f"{bare} ms/step")
        else:
            return
        self.mark = time.perf_counter()


def time_med(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return med(out)


def breakdown(trainer, cfg, reps: int) -> dict[str, float]:
    """Seconds per step of the trainer's pieces that a bare loop does not have, each timed on its own."""
    from difftrain.data.loader import ShardLoader
    from difftrain.diffusion.keyed import keyed_rand, keyed_randn
    from difftrain.train.engine import clip_grad_norm_

    B, seed = cfg.data.batch_size, cfg.run.seed
    loader = iter(ShardLoader(cfg.data.train, B, num_workers=0, seed=seed, channels=cfg.data.channels,
                              image_size=cfg.data.image_size))
    next(loader)
    out = {"data decode (worker CPU)": time_med(lambda: next(loader), reps)}
    batch = next(loader)
    idx, shape = batch["index"], batch["pixels"].shape[1:]

    def rng():
        keyed_rand(seed, 7, idx, "dropout")
        keyed_randn(seed, 7, idx, shape, "noise")
        keyed_rand(seed, 7, idx, "t", torch.float64)

    out["keyed RNG (dropout, noise, t)"] = time_med(rng, reps)
    if cfg.model.cond == "text":
        out["MiniLM caption encode"] = time_med(lambda: trainer.conditioner(batch["captions"], None, None), reps)
    eng = trainer.engine
    for p in eng.params:
        p.grad = torch.randn_like(p)
    out["grad-norm clip"] = time_med(lambda: clip_grad_norm_(eng.params, cfg.optim.grad_clip), reps)
    for p in eng.params:
        p.grad = None
    out["EMA update"] = time_med(lambda: eng.ema.update(1000), reps)
    return out


def trainer_overhead(case: str, plan: Plan, data: dict, tmp: Path) -> dict:
    from difftrain.train.trainer import Trainer

    cfg = case_config(case, data, tmp / f"run_{case}", plan)
    trainer = Trainer(cfg)
    bares = {f: BareLoop(cfg, trainer, f) for f in FEEDS}
    inter = Interleave(case, plan, bares)
    trainer.callbacks.append(inter)
    log(f"[{case}] trainer vs bare: {plan.warmup} warm-up steps, then {plan.block} bare + "
        f"{plan.blocks} x ({plan.block} trainer + {plan.block} bare), bare = each of {', '.join(FEEDS)}")
    trainer.fit()
    T = inter.trainer_s
    res = {"ours_sps": plan.block * len(T) / sum(T), "ours_ms": med(T) / plan.block * 1e3}
    for f, Bs in inter.bare_s.items():
        # each trainer block against the mean of the bare blocks either side: linear drift cancels
        ratios = [T[j] / ((Bs[j] + Bs[j + 1]) / 2) for j in range(len(T))]
        res[f] = {"sps": plan.block * len(Bs) / sum(Bs), "ms": med(Bs) / plan.block * 1e3,
                  "ratio": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    log(f"[{case}] overhead breakdown")
    res["breakdown"] = breakdown(trainer, cfg, reps=5)
    inproc = sum(v for k, v in res["breakdown"].items() if not k.startswith("data decode"))
    res["pieces_pct"] = 100 * inproc * 1e3 / res["preloaded"]["ms"]
    del trainer, bares, inter
    gc.collect()  # shuts the loader worker down
    return res


# ------------------------------------------------------------------------------------------------ part 2
def dit_pair(case: str):
    import diffusers

    from difftrain.config import ModelConfig
    from difftrain.models import registry
    from difftrain.models.dit_export import convert_state_dict, diffusers_target

    name, size, ch = ("DiT-T/2", 16, 1) if case == "demo" else ("DiT-S/2", 32, 3)
    arch, acfg = registry.arch_config(ModelConfig(name=name, image_size=size, in_channels=ch, cond="class",
                                                  num_classes=10))
    ours = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-init would make the equality check trivial
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    cls, kwargs = diffusers_target(acfg)
    theirs = getattr(diffusers, cls)(**kwargs)
    theirs.load_state_dict(convert_state_dict(acfg, ours.state_dict()), strict=True)
    return ours, theirs, (size, ch), cls, kwargs


def dit_comparison(case: str, plan: Plan) -> dict:
    ours, theirs, (size, ch), cls, kwargs = dit_pair(case)
    B = plan.batch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, ch, size, size, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, 11, (B,), generator=g)
    target = torch.randn(B, ch, size, size, generator=g)
    fwd = {"ours": lambda: ours(x, t, {"class_labels": y}),
           "diffusers": lambda: theirs(x, timestep=t * 1000, class_labels=y).sample}
    ours.eval(), theirs.eval()  # in train mode diffusers drops labels at random (its class_dropout_prob=0.1)
    with torch.no_grad():
        a, b = fwd["ours"](), fwd["diffusers"]()
        diff = ((a - b).abs().max() / a.abs().max()).item()
    ours.train(), theirs.train()
    log(f"[{case}] ours vs {cls}: max |output difference| / max |output| = {diff:.1e}")
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True),
            "diffusers": torch.optim.AdamW(theirs.parameters(), lr=1e-4, foreach=True)}

    def train(name):
        F.mse_loss(fwd[name](), target).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    def infer(name):
        with torch.no_grad():
            fwd[name]()

    res = {"max_rel_diff": diff, "params_ours": sum(p.numel() for p in ours.parameters()),
           "params_diffusers": sum(p.numel() for p in theirs.parameters())}
    for label, fn, warm, k in (("fwd", infer, plan.fwd_warmup, plan.fwd_k),
                               ("train", train, plan.train_warmup, plan.train_k)):
        for name in ("ours", "diffusers"):
            for _ in range(warm):
                fn(name)
        times = {"ours": [], "diffusers": []}
        for r in range(plan.repeats):
            for name in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(name)
                times[name].append((time.perf_counter() - t0) / k)
            log(f"[{case}] {label} repeat {r + 1}/{plan.repeats}: ours {times['ours'][-1] * 1e3:.0f} ms, "
                f"diffusers {times['diffusers'][-1] * 1e3:.0f} ms")
        ratios = [d / o for o, d in zip(times["ours"], times["diffusers"])]
        res[label] = {"ours_ms": med(times["ours"]) * 1e3, "diffusers_ms": med(times["diffusers"]) * 1e3,
                      "ratio": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return res


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min): few steps, dits2 at batch 4")
    ap.add_argument("--cases", default="demo,dits2", help="comma-separated subset of demo,dits2")
    args = ap.parse_args()
    torch.set_num_threads(2)
    plans = PLANS["quick" if args.quick else "full"]
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in plans:
            ap.error(f"unknown case {c!r}; valid: {', '.join(plans)}")

    from difftrain.data.demo import write_digits
    from difftrain.launch.env import shutdown

    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="difftrain_bench_") as tmp:
        tmp = Path(tmp)
        data = {s: write_digits(tmp / f"digits{s}", image_size=s, progress=False)["train"] for s in (16, 32)}
        try:
            for c in cases:
                results[c] = {"overhead": trainer_overhead(c, plans[c], data, tmp)}
            for c in cases:
                results[c]["dit"] = dit_comparison(c, plans[c])
        finally:
            shutdown()

    # ------------------------------------------------------------------ report
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average at start {load:.2f}, {'quick' if args.quick else 'full'} run")
    print("\nTrainer vs bare loops (fp32, ms per step: median over blocks; overhead from the median block ratio)")
    print("bare-loader: same shards through the same loader (1 worker), captions encoded every step; "
          "bare-preloaded: 4 batches in memory\n")
    print("| case | batch | trainer ms | bare-loader ms | bare-preloaded ms | overhead vs bare-loader % (min..max) "
          "| overhead vs bare-preloaded % (min..max) |")
    print("|---|---|---|---|---|---|---|")

    def pct(r):
        return f"{100 * (r['ratio'] - 1):.1f} ({100 * (r['ratio_min'] - 1):.1f}..{100 * (r['ratio_max'] - 1):.1f})"

    for c in cases:
        o = results[c]["overhead"]
        print(f"| {c} | {plans[c].batch} | {o['ours_ms']:.0f} | {o['loader']['ms']:.0f} | {o['preloaded']['ms']:.0f} "
              f"| {pct(o['loader'])} | {pct(o['preloaded'])} |")
    print("\nTrainer pieces a bare loop does not have (ms, each timed alone, median of 5)\n")
    pieces = list(dict.fromkeys(k for c in cases for k in results[c]["overhead"]["breakdown"]))
    print("| piece | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for k in pieces:
        cells = [results[c]["overhead"]["breakdown"].get(k) for c in cases]
        print(f"| {k} | " + " | ".join("-" if v is None else f"{v * 1e3:.1f}" for v in cells) + " |")
    print("| in-process pieces / bare step | " + " | ".join(
        f"{results[c]['overhead']['pieces_pct']:.1f} %" for c in cases) + " |")
    print("| measured trainer - bare-preloaded | " + " | ".join(
        f"{results[c]['overhead']['ours_ms'] - results[c]['overhead']['preloaded']['ms']:.1f}" for c in cases) + " |")
    print("\nOur DiT vs diffusers DiTTransformer2DModel, class-conditional, same size and weights "
          "(ms per step, medians; ratio = diffusers time / ours, > 1: ours faster)\n")
    print("| case | batch | params ours / diffusers | train ours | train diffusers | train ratio (min..max) "
          "| fwd ours | fwd diffusers | fwd ratio (min..max) | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        d = results[c]["dit"]
        tr, fw = d["train"], d["fwd"]
        print(f"| {c} | {plans[c].batch} | {d['params_ours'] / 1e6:.2f}M / {d['params_diffusers'] / 1e6:.2f}M | "
              f"{tr['ours_ms']:.0f} | {tr['diffusers_ms']:.0f} | {tr['ratio']:.3f} ({tr['ratio_min']:.3f}.."
              f"{tr['ratio_max']:.3f}) | {fw['ours_ms']:.0f} | {fw['diffusers_ms']:.0f} | {fw['ratio']:.3f} "
              f"({fw['ratio_min']:.3f}..{fw['ratio_max']:.3f}) | {d['max_rel_diff']:.1e} |")
    figures = {}
    for c in cases:
        o, d = results[c]["overhead"], results[c]["dit"]
        figures[f"{c}_overhead_pct"] = f"{100 * (o['loader']['ratio'] - 1):.1f}"
        figures[f"{c}_overhead_vs_preloaded_pct"] = f"{100 * (o['preloaded']['ratio'] - 1):.1f}"
        figures[f"{c}_pieces_pct"] = f"{o['pieces_pct']:.1f}"
        figures[f"{c}_trainer_sps"] = f"{o['ours_sps']:.3f}"
        figures[f"{c}_bare_loader_sps"] = f"{o['loader']['sps']:.3f}"
        figures[f"{c}_bare_preloaded_sps"] = f"{o['preloaded']['sps']:.3f}"
        figures[f"{c}_ours_vs_diffusers"] = f"{d['train']['ratio']:.3f}"
        figures[f"{c}_ours_vs_diffusers_fwd"] = f"{d['fwd']['ratio']:.3f}"
    figures["load_avg_start"] = f"{load:.2f}"
    figures["wall_s"] = f"{time.perf_counter() - t_start:.0f}"
    print()
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
