"""Noise schedules, immiscible noise and rectified flow on the digits at a fixed training budget.

    python benchmarks/schedules.py                      # 7 variants x 3 seeds, ~1 h on 2 idle cores
    python benchmarks/schedules.py --seeds 0 --only cosine_eps,laplace_eps --steps 150   # a quick look

Every run is the real trainer (``python -m difftrain train``, one process, 2 threads) on the demo's digits shards
with a ``configs/digits_*.yaml`` recipe plus the variant's overrides, the same budget for all (the recipe's
``run.steps``, 300 = 19200 images), scored during training by the validation callback: FID and class
accuracy of ``eval.num`` conditional samples (10 ``dpmpp_2m`` steps, CFG 2.0, fixed noise) in the built-in
``digits`` classifier's features against the first ``eval.num`` training images, every ``eval.every`` steps on
the EMA weights. Each run's curve is written to ``OUT/<variant>_s<seed>.json`` as soon as it ends, so a killed
benchmark resumes where it stopped (finished runs are skipped; delete a JSON to redo one).

Comparisons (paired by seed: the same seed gives the same data order and initial weights):

* cosine vs Laplace (Hang & Gu 2024) with the eps and with the v target, both on the VP-cosine path;
* vanilla vs immiscible noise (Li et al. 2024): linear assignment and KNN (k = 4) on the cosine/v baseline;
* VP (cosine, v) vs rectified flow with the logit-normal density (velocity target).

Steps-to-target: the target FID is the comparison baseline's final FID (mean over seeds); a run's steps-to-target
is the first step where its FID curve (linear between evaluations) reaches it, ``> budget`` if never. Writes a
PNG of FID vs step per comparison (mean ± std over seeds) and ends with one line of ``key=value`` figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (recipe, overrides)
    "cosine_eps": ("configs/digits_cosine.yaml", []),
    "laplace_eps": ("configs/digits_laplace.yaml", []),
    "cosine_v": ("configs/digits_cosine.yaml", ["diffusion.target=v"]),
    "laplace_v": ("configs/digits_laplace.yaml", ["diffusion.target=v"]),
    "cosine_v_la": ("configs/digits_cosine.yaml", ["diffusion.target=v", "diffusion.assign=linear"]),
    "cosine_v_knn": ("configs/digits_cosine.yaml", ["diffusion.target=v", "diffusion.assign=knn"]),
    "rf_logit_normal": ("configs/digits_rf.yaml", []),
}
COMPARISONS = {  # name: [baseline, others...]
    "cosine vs Laplace (eps)": ["cosine_eps", "laplace_eps"],
    "cosine vs Laplace (v)": ["cosine_v", "laplace_v"],
    "vanilla vs immiscible (cosine, v)": ["cosine_v", "cosine_v_la", "cosine_v_knn"],
    "VP vs rectified flow": ["cosine_v", "rf_logit_normal"],
}
SCALARS = ("fid", "class_acc", "precision", "recall", "straightness")


def run_one(name: str, seed: int, out: Path, extra: list[str]) -> dict:
    recipe, overrides = VARIANTS[name]
    run_dir = out / "runs" / f"{name}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run restarts from scratch
    cmd = [sys.executable, "-m", "difftrain", "train", recipe, f"run.dir={run_dir}", f"run.seed={seed}",
           "run.progress=false", *overrides, *extra]
    t0 = time.perf_counter()
    with open(out / "runs" / f"{name}_s{seed}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"run {name} seed {seed} failed (exit {rc}); see {out / 'runs' / f'{name}_s{seed}.log'}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    curves = {k: [(e.step, e.value) for e in ea.Scalars(f"eval/{k}")] for k in SCALARS if f"eval/{k}" in ea.Tags()["scalars"]}
    result = {"variant": name, "seed": seed, "recipe": recipe, "overrides": overrides + extra,
              "steps": [s for s, _ in curves["fid"]], **{k: [v for _, v in c] for k, c in curves.items()},
              "wall_s": time.perf_counter() - t0}
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the curves are the result; keep tb + samples
    return result


def steps_to(target: float, steps: list[int], fid: list[float]) -> float:
    """First step where the piecewise-linear FID curve reaches ``target``; inf if it never does."""
    if fid[0] <= target:
        return float(steps[0])
    for (s0, f0), (s1, f1) in zip(zip(steps, fid), zip(steps[1:], fid[1:])):
        if f1 <= target:
            return s0 + (s1 - s0) * (f0 - target) / (f0 - f1)
    return float("inf")


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], digits: int = 2) -> str:
    if any(x == float("inf") for x in xs):
        done = [x for x in xs if x != float("inf")]
        return f"> budget in {len(xs) - len(done)}/{len(xs)}" + (f" (others {statistics.fmean(done):.0f})" if done else "")
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COMPARISONS), figsize=(4.2 * len(COMPARISONS), 3.6), dpi=110, sharey=True)
    for ax, (title, names) in zip(axes, COMPARISONS.items()):
        for name in names:
            runs = results.get(name, [])
            if not runs:
                continue
            steps = runs[0]["steps"]
            per_step = list(zip(*[r["fid"] for r in runs]))
            m = [statistics.fmean(v) for v in per_step]
            s = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
            ax.plot(steps, m, marker="o", label=f"{name} (n={len(runs)})")
            ax.fill_between(steps, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("FID (digits features), mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(results: dict, figures: dict) -> None:
    print("\n| variant | runs | final FID | class acc | precision | recall | straightness |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        final = {k: [r[k][-1] for r in runs] for k in SCALARS if k in runs[0]}
        print(f"| {name} | {len(runs)} | " + " | ".join(fmt(final[k], 3 if k != "fid" else 2) if k in final else "-"
                                                      for k in SCALARS) + " |")
        figures[f"fid_{name}"] = statistics.fmean(final["fid"])
        figures[f"acc_{name}"] = statistics.fmean(final["class_acc"])
    print("\n| comparison | variant | final FID − baseline (paired) | steps to the baseline's final FID |")
    print("|---|---|---|---|")
    for title, (base, *others) in COMPARISONS.items():
        if base not in results:
            continue
        by_seed = {r["seed"]: r for r in results[base]}
        target = statistics.fmean(r["fid"][-1] for r in results[base])
        for name in [base, *others]:
            runs = [r for r in results.get(name, []) if r["seed"] in by_seed]
            if not runs:
                continue
            diff = [r["fid"][-1] - by_seed[r["seed"]]["fid"][-1] for r in runs]
            reach = [steps_to(target, r["steps"], r["fid"]) for r in runs]
            print(f"| {title} (target {target:.2f}) | {name} | {fmt(diff) if name != base else '-'} | {fmt(reach, 0)} |")
            if name != base:
                figures[f"dfid_{name}_vs_{base}"] = statistics.fmean(diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench_schedules")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all)")
    ap.add_argument("--steps", type=int, default=0, help="override the recipes' run.steps (0: keep, 300)")
    ap.add_argument("--plot", default="docs/schedules_fid_vs_step.png")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not Path("data/digits/train").is_dir():
        subprocess.check_call([sys.executable, "-m", "difftrain", "data", "demo", "--out", "data/digits"])
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    extra = [f"run.steps={args.steps}", f"eval.every={max(1, args.steps // 4)}"] if args.steps else []
    seeds = [int(s) for s in args.seeds.split(",")]
    t0, done = time.perf_counter(), 0
    for seed in seeds:  # seed-major: a partial benchmark covers every variant
        for name in names:
            path = out / f"{name}_s{seed}.json"
            if path.exists():
                continue
            res = run_one(name, seed, out, extra)
            path.write_text(json.dumps(res, indent=1))
            done += 1
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: final fid {res['fid'][-1]:.2f} "
                  f"class_acc {res['class_acc'][-1]:.3f} ({res['wall_s']:.0f} s)", flush=True)
    results: dict[str, list] = {}
    for name in names:
        for seed in seeds:
            path = out / f"{name}_s{seed}.json"
            if path.exists():
                results.setdefault(name, []).append(json.loads(path.read_text()))
    figures = {"runs_new": done, "wall_s": time.perf_counter() - t0}
    report(results, figures)
    plot(results, Path(args.plot))
    print(f"\nplot: {args.plot}")
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
