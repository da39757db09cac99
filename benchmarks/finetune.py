"""Fine-tuning the digits model to a style it has not seen (bold strokes): full fine-tuning vs LoRA (r = 4, 16, 64)
vs DiffFit, in FID, class accuracy, trainable parameters, per-rank gradient + optimizer bytes and step time.

    python benchmarks/finetune.py                  # the full run (resumable; ~28 min on 2 shared cores)
    python benchmarks/finetune.py --quick          # every piece at toy size (6 min): checks the script
    python benchmarks/finetune.py --dir runs/bench_finetune_400 --base runs/bench_finetune/campaign/base \
        --methods full,lora4 --ft-steps 400 --seeds 2   # longer fine-tuning from the same base

Everything is the real CLI under torchrun (2 gloo processes). ``difftrain data demo`` writes the digits twice, plain
and ``--style bold`` (the same split, keys and captions, every stroke dilated: ``difftrain/data/demo.py``). One
campaign (``difftrain campaign``, docs/CAMPAIGNS.md) pre-trains the base on the plain digits (configs/demo.yaml: the
text-conditional DiT-T/2, rectified flow) and fine-tunes it on the bold training split from its EMA weights
(``from: base``, i.e. ``init_from=DIR/campaign/base@ema``) with each method of :data:`METHODS` and seeds 0, 1, 2:

* ``full``: every weight trains (lr 2e-4);
* ``lora4`` / ``lora16`` / ``lora64``: ``adapt: [{kind: lora, rank: R}]`` on the attention and MLP linears
  (alpha = r; lr 1e-3);
* ``lora4all``: r = 4 on every linear of the blocks: self- and cross-attention, MLP and modulation (lr 1e-3);
* ``difffit``: ``adapt: [{kind: difffit}]`` (biases, modulation tables and γ on the first half of the blocks;
  Xie et al. 2023; lr 1e-3).

The rates were not tuned: the adapters at 5x full fine-tuning's, as parameter-efficient methods usually run higher.

All use the same batch, steps, warmup, constant schedule and an EMA (decay 0.95) that the evaluation samples.
``difftrain eval`` then scores, per seed s, every method's run fine-tuned with seed s (and the base, not fine-tuned)
sampled with seed s: ``--extractor digits:bold`` (the digits classifier trained on the bold *training* split)
against the 180 bold held-out images, so FID and class accuracy are paired by seed.

A probe (this file under torchrun with ``--probe``) builds each method's ``Trainer`` on 2 ranks with
``parallel.engine=fsdp2`` and counts, on every rank, the bytes of the tensors it holds: the local shards of the
gradients (read in a hook just before the optimizer step) and of AdamW's state, then times train steps, methods
interleaved round-robin (rotating which goes first), the slower rank per step.

Every result is kept under ``DIR`` (the campaign's runs, each evaluation's chunks, ``DIR/probe.json``), so a killed
benchmark rerun resumes where it stopped. Writes ``DIR/results.md`` and ``DIR/fid_by_method.png`` and ends with one
line of ``key=value`` figures: ``lora_vs_full_fid`` (the paired ratio of LoRA's FID to full fine-tuning's at the
headline rank :data:`HEADLINE`, the largest whose trainable share is within the issue's 5%; ``lora{r}_vs_full_fid``
for every rank, with ``_lo`` / ``_hi``: 95% t-intervals over the seeds), ``lora_param_pct``,
``lora_vs_full_optim_mem`` (the ratio of the measured per-rank gradient + optimizer bytes), ``controlnet_class_match``
(nan: the ControlNet of issue 17 is not built yet), per-method FID, class accuracy, trainable %, bytes and step time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]
from distill import run, torchrun  # noqa: E402  (the sibling benchmark's launchers)
SEEDS = [0, 1, 2]
FULL = {"base": 400, "ft": 100, "samples": 500, "steps": 12, "rounds": 10}
QUICK = {"base": 20, "ft": 4, "samples": 100, "steps": 4, "rounds": 2}
# method -> its fine-tuning overrides (on top of COMMON_FT)
METHODS = {
    "full": ["optim.lr=2e-4"],
    "lora4": ["adapt=[{kind: lora, rank: 4}]", "optim.lr=1e-3"],
    "lora16": ["adapt=[{kind: lora, rank: 16}]", "optim.lr=1e-3"],
    "lora64": ["adapt=[{kind: lora, rank: 64}]", "optim.lr=1e-3"],
    # r = 4 on every linear, the conditioning paths too (caption cross-attention, the timestep/modulation MLP)
    "lora4all": ["adapt=[{kind: lora, rank: 4, targets: [attn, cross_attn, mlp, modulation]}]", "optim.lr=1e-3"],
    "difffit": ["adapt=[{kind: difffit}]", "optim.lr=1e-3"],
}
LORA_RANKS = [4, 16, 64]
HEADLINE = 4  # the headline LoRA rank: the largest of LORA_RANKS within 5% trainable parameters on DiT-T/2
COMMON_FT = ["data.batch_size=32", "optim.warmup_steps=10", "optim.schedule=constant", "optim.ema_decay=0.95"]


def campaign_yaml(d: Path, data: dict, n: dict, methods: list[str], base: str = "") -> str:
    """The campaign: the base (unless ``base`` names a trained run) and every method x seed fine-tuned from it."""
    common = "[data.num_workers=1, eval.every=0, run.sample_every=0, run.log_every=25, run.progress=false]"
    origin = [f"init_from={base}@ema"] if base else []
    stages = "".join(
        f"  {m}_s{s}: {{{'' if base else 'from: base, '}overrides: [run.steps={n['ft']}, run.seed={s}, "
        f"run.ckpt_every=0, data.train={data['bold']['train']}, "
        + ", ".join(f'"{o}"' for o in origin + COMMON_FT + METHODS[m]) + "]}\n"
        for s in SEEDS for m in methods)
    base_stage = "" if base else (f"  base: {{overrides: [run.steps={n['base']}, run.ckpt_every=500, "
                                  f"data.train={data['plain']['train']}]}}\n")
    return f"""# written by benchmarks/finetune.py
dir: {d / "campaign"}
config: {REPO / "configs/demo.yaml"}
overrides: {common}
stages:
{base_stage}{stages}"""


def evaluate(d: Path, data: dict, n: dict, models: list[str], seed: int, log: Path, base: str) -> list[dict]:
    """One ``difftrain eval`` launch over ``models`` (stages under DIR/campaign; ``base``: the base run) at sampling
    seed ``seed``, against the bold held-out images in the bold classifier's features; cached in DIR/eval/seedS."""
    out = d / "eval" / f"seed{seed}"
    done = out / "results.json"
    if not done.is_file() or len(json.loads(done.read_text())) != len(models):
        paths = [base if m == "base" else str(d / "campaign" / m) for m in models]
        torchrun(2, ["eval", *paths, "--ref", data["bold"]["val"], "--ref-samples", str(data["bold"]["num_val"]),
                     "--extractor", "digits:bold", "--samples", str(n["samples"]), "--steps", str(n["steps"]),
                     "--sampler", "dpmpp_2m", "--seed", str(seed), "--out", str(out)], log)
    return [{**r, "model": m, "seed": seed} for m, r in zip(models, json.loads(done.read_text()))]


# ------------------------------------------------------------------------------------------------------- the probe
def _local_bytes(t) -> int:
    """Bytes of the part of ``t`` this rank holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def probe(spec: Path) -> None:
    """Under torchrun (2 ranks): each method's trainer under FSDP2; bytes held per rank and interleaved step times.
    Rank 0 writes ``{method: {...}}`` to the JSON file named in the spec."""
    import torch
    import torch.distributed as dist

    from difftrain.config_checks import load_config
    from difftrain.train.metrics import Metrics
    from difftrain.train.supervise import StopSignal
    from difftrain.train.trainer import LookAhead, Trainer

    job = json.loads(spec.read_text())
    signals = StopSignal().install()
    trainers, held = {}, {}
    for m, overrides in job["methods"].items():
        cfg = load_config(job["config"], overrides, world_size=int(os.environ["WORLD_SIZE"]))
        t = Trainer(cfg, signals=signals)
        t.metrics = Metrics(t.run_dir, t.rank, t.meshes.dp, t.device, cfg.run, 0)
        t._data = LookAhead(t.loader)
        rec = held[m] = {}
        step = t.engine.step

        def hooked(i, loss, step=step, t=t, rec=rec):  # the gradients as they are when the optimizer reads them
            rec["grad_bytes"] = sum(_local_bytes(p.grad) for p in t.engine.params if p.grad is not None)
            return step(i, loss)

        t.engine.step = hooked
        trainers[m] = t
    names = list(trainers)
    times = {m: [] for m in names}
    for rnd in range(job["rounds"] + 1):  # round 0 warms up (and creates AdamW's state)
        k = rnd % len(names)
        for m in names[k:] + names[:k]:
            t = trainers[m]
            dist.barrier()
            t0 = time.perf_counter()
            t.train_step(next(t._data))
            t.step += 1
            dt = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slower rank sets the step's time
            if rnd:
                times[m].append(float(dt))
    out = {}
    for m, t in trainers.items():
        model = t.engine.module
        opt = sum(_local_bytes(v) for s in t.engine.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
        mine = {"grad_bytes": held[m]["grad_bytes"], "optim_bytes": opt,
                "param_bytes": sum(_local_bytes(p) for p in model.parameters()),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "params": sum(p.numel() for p in model.parameters())}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        out[m] = {"ranks": every, "step_s": times[m]}
        t._data.close()
        t.metrics.close()
    signals.restore()
    if dist.get_rank() == 0:
        Path(job["out"]).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def measure(d: Path, n: dict, methods: list[str], log: Path, base: str) -> dict:
    """The probe's figures, kept in DIR/probe.json (delete it to measure again)."""
    out = d / "probe.json"
    if not out.is_file():
        # the fine-tuning runs' settings under FSDP2 on 2 ranks; the trainer's numbers do not depend on the init
        base = [f"data.train={d / 'data' / 'bold' / 'train' / '{00000..00006}.tar'}", "eval.every=0",
                "run.sample_every=0", "run.progress=false", "data.num_workers=1", "parallel.engine=fsdp2",
                f"init_from={base}@ema", f"run.steps={n['rounds'] + 1}", *COMMON_FT]
        job = {"config": str(REPO / "configs/demo.yaml"), "rounds": n["rounds"], "out": str(out),
               "methods": {m: [*base, *METHODS[m], f"run.dir={d / 'probe' / m}"] for m in methods}}
        spec = d / "probe_job.json"
        spec.write_text(json.dumps(job))
        torchrun(2, [str(Path(__file__).resolve()), "--probe", str(spec)], log, "probe (fsdp2, 2 ranks)")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------ statistics
def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds."""
    from scipy.stats import t as student

    m = statistics.mean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = student.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """a/b paired by seed: geometric mean and 95% t-interval of the log ratios (one seed: no interval)."""
    from pipeline import ratio_ci

    if len(a) < 2:
        return a[0] / b[0], float("nan"), float("nan")
    return ratio_ci(a, b)


def plot(fid: dict, path: Path, extractor: str, base_fid: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(fid)
    mid = [fid[m][0] for m in names]
    err = [[m_ - (lo if lo == lo else m_) for m_, lo, _ in fid.values()],
           [(hi if hi == hi else m_) - m_ for m_, _, hi in fid.values()]]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.bar(names, mid, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(base_fid, color="gray", linestyle="--", label=f"base, not fine-tuned ({base_fid:.1f})")
    ax.set_ylabel(f"FID to bold held-out ({extractor})")
    ax.set_title("digits -> bold digits: mean over seeds, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="runs/bench_finetune")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks every piece in a few minutes")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1 (default 3)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"a comma-separated subset of {', '.join(METHODS)}"
                    " (full is always in: the ratios are to it)")
    ap.add_argument("--ft-steps", type=int, default=0, help="fine-tuning steps (default 100, --quick 4)")
    ap.add_argument("--base", default="", help="a trained base run to fine-tune (default: DIR/campaign/base, "
                    "trained here on the plain digits)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # the torchrun worker of the memory/time probe
    a = ap.parse_args()
    if a.probe:
        return probe(Path(a.probe))
    SEEDS[:] = list(range(a.seeds))
    n = {**(QUICK if a.quick else FULL), **({"ft": a.ft_steps} if a.ft_steps else {})}
    wanted = ["full", *(m for m in a.methods.split(",") if m != "full")]
    if any(m not in METHODS for m in wanted):
        sys.exit(f"--methods {a.methods}: each must be one of {', '.join(METHODS)}")
    d = (REPO / a.dir).resolve() if not Path(a.dir).is_absolute() else Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    log = d / "log.txt"
    t0 = time.time()
    load = os.getloadavg()[0]
    from difftrain.finetune.adapt import KINDS

    methods = [m for m in wanted if "adapt=[{kind: difffit}]" not in METHODS[m] or "difffit" in KINDS]
    if len(methods) < len(wanted):
        print("DiffFit is not registered (difftrain/finetune/adapt.py KINDS): skipped", flush=True)
    data = {}
    for style in ("plain", "bold"):
        folder = d / "data" / style
        if not (folder / "train").is_dir():
            run([sys.executable, "-m", "difftrain", "data", "demo", "--out", str(folder), "--style", style], log)
        data[style] = {"train": str(folder / "train" / "{00000..00006}.tar"),
                       "val": str(folder / "val" / "{00000..00000}.tar"), "num_val": 180}
    base_run = str(Path(a.base).resolve()) if a.base else str(d / "campaign" / "base")
    (d / "campaign.yaml").write_text(campaign_yaml(d, data, n, methods, a.base and base_run))
    print(f"campaign {d / 'campaign.yaml'} (log {log})", flush=True)
    torchrun(2, ["campaign", str(d / "campaign.yaml"), "--skip-eval"], log)
    walls = {}
    for m in methods:
        w = [json.loads((d / "campaign" / f"{m}_s{s}" / "campaign.json").read_text()).get("wall_s") for s in SEEDS]
        walls[m] = statistics.mean(w) if None not in w else float("nan")

    rows = []
    for s in SEEDS:  # every method fine-tuned with seed s, sampled with seed s; the base once (seed 0)
        models = (["base"] if s == 0 else []) + [f"{m}_s{s}" for m in methods]
        rows += evaluate(d, data, n, models, s, log, base_run)
    by = {m: [next(r for r in rows if r["model"] == f"{m}_s{s}") for s in SEEDS] for m in methods}
    base = next(r for r in rows if r["model"] == "base")
    prb = measure(d, n, methods, log, base_run)

    fid = {m: mean_ci([r["fid"] for r in by[m]]) for m in methods}
    acc = {m: statistics.mean(r["class_acc"] for r in by[m]) for m in methods}
    rank0 = {m: prb[m]["ranks"][0] for m in methods}
    pct = {m: 100 * r["trainable_params"] / r["params"] for m, r in rank0.items()}
    mem = {m: max(r["grad_bytes"] + r["optim_bytes"] for r in prb[m]["ranks"]) for m in methods}  # the larger rank
    step = {m: statistics.median(prb[m]["step_s"]) for m in methods}
    full_fids = [r["fid"] for r in by["full"]]
    lines = ["| model | seed | FID | KID | precision | recall | class acc |", "|---" * 7 + "|"]
    for r in [base] + [r for m in methods for r in by[m]]:
        lines.append(f"| {r['model']} | {r['seed']} | {r['fid']:.2f} | {r['kid']:.1f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r.get('class_acc', float('nan')):.3f} |")
    lines += ["", "| method | FID (mean, 95% CI) | FID / full (paired, 95% CI) | class acc | trainable params (%) | "
              "grad + optimizer bytes per rank (fsdp2, 2 ranks) | step ms (fsdp2, median) | step / full (95% CI) | "
              "train wall s (ddp) |", "|---" * 9 + "|"]
    figures: dict = {}
    for m in methods:
        ratio = paired_ratio([r["fid"] for r in by[m]], full_fids)
        tr = paired_ratio(prb[m]["step_s"], prb["full"]["step_s"])
        g = max(r["grad_bytes"] for r in prb[m]["ranks"])
        lines.append(f"| {m} | {fid[m][0]:.2f} [{fid[m][1]:.2f}, {fid[m][2]:.2f}] | {ratio[0]:.3f} "
                     f"[{ratio[1]:.3f}, {ratio[2]:.3f}] | {acc[m]:.3f} | {rank0[m]['trainable_params']:,} "
                     f"({pct[m]:.2f}%) | {mem[m]:,} (grad {g:,}) | {step[m] * 1e3:.0f} | {tr[0]:.3f} "
                     f"[{tr[1]:.3f}, {tr[2]:.3f}] | {walls[m]:.0f} |")
        figures.update({f"{m}_fid": fid[m][0], f"{m}_class_acc": acc[m], f"{m}_param_pct": pct[m],
                        f"{m}_optim_bytes": mem[m], f"{m}_step_ms": step[m] * 1e3})
        if m.startswith("lora"):
            figures.update({f"{m}_vs_full_fid": ratio[0], f"{m}_vs_full_fid_lo": ratio[1],
                            f"{m}_vs_full_fid_hi": ratio[2], f"{m}_vs_full_optim_mem": mem[m] / mem["full"]})
        if m == "difffit":
            figures.update({"difffit_vs_full_fid": ratio[0], "difffit_vs_full_optim_mem": mem[m] / mem["full"]})
    lines += ["", f"base (plain digits, not fine-tuned) against the bold held-out images: FID {base['fid']:.2f}, "
              f"class acc {base.get('class_acc', float('nan')):.3f}",
              f"per-rank parameter bytes (fsdp2, rank 0): " + ", ".join(f"{m} {rank0[m]['param_bytes']:,}"
                                                                        for m in methods)]
    (d / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(fid, d / "fid_by_method.png", "digits:bold", base["fid"])
    h = f"lora{HEADLINE}" if f"lora{HEADLINE}" in methods else next((m for m in methods if m.startswith("lora")), None)
    if h is None:
        sys.exit("no LoRA method in --methods: nothing to compare")
    figures = {"lora_vs_full_fid": figures[f"{h}_vs_full_fid"], "lora_vs_full_fid_lo": figures[f"{h}_vs_full_fid_lo"],
               "lora_vs_full_fid_hi": figures[f"{h}_vs_full_fid_hi"], "lora_rank": int(h[len("lora"):]),
               "lora_param_pct": pct[h], "lora_vs_full_optim_mem": mem[h] / mem["full"],
               "controlnet_class_match": float("nan"), "base_fid": base["fid"], **figures,
               "seeds": len(SEEDS), "ft_steps": n["ft"], "base_steps": n["base"], "quick": int(a.quick),
               "load_avg_start": load, "wall_s": time.time() - t0}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
