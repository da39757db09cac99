"""Reflow and progressive distillation on the digits: does 2-RF straighten the teacher's flow and beat it at one
step, and how close do progressive students of 4, 2 and 1 steps come to the teacher's best?

    python benchmarks/distill.py                       # the full run (resumable; training ~80 min + few-step ~55 min here)
    python benchmarks/distill.py --quick               # every piece at toy size (329 s here): checks the script

Everything is the real CLI under torchrun (2 gloo processes): a campaign (``difftrain campaign``, docs/CAMPAIGNS.md)
trains the teacher (configs/demo.yaml trained longer: the text-conditional DiT-T/2, rectified flow), writes its
reflow pairs (32 Euler steps at the demo's CFG 2.0), trains 2-RF on them with 3 seeds and progressive students
4 -> 2 -> 1 steps (the first round distils the guided teacher at CFG 2.0 from its 8 DDIM steps). Then
``difftrain eval`` scores 1000 samples against the 1617 training images with the built-in digits extractor:

* the teacher's best FID: the minimum over euler / heun / dpmpp_2m x NFE 1, 2, 4, 8, 16, 32 (Heun at the steps whose
  NFE is closest from below);
* 1-RF (the teacher) vs 2-RF at one Euler step, paired by seed s (2-RF trained with seed s, both sampled with seed
  s), and the straightness of both flows (Liu et al. 2022, eq. 5: the mean squared deviation of the velocity from
  the straight line, 256 samples, 32 Euler steps, the pairs' CFG scale for the teacher, none for 2-RF whose pairs
  carry it);
* each progressive student at its own step count (DDIM, no CFG: it is distilled in);
* the few-step students of issue 16 (``FEW``, each from the teacher, ``FULL["few"]`` steps at lr 1e-4): consistency
  distillation (Heun teacher steps, CFG 2 distilled in) and easy consistency tuning (iCT's recipe from the teacher)
  at NFE 1, 2, 4 with their multistep consistency samplers, DMD2's one-step generator at NFE 1; then the best
  student at 1 NFE and at 2 NFE (any method; a progressive round keeps one seed) trained and sampled with seeds 1
  and 2 as well: ``ratio_1nfe`` / ``ratio_2nfe`` are their mean FID over the 3 seeds / the teacher's best.

Every result is kept under ``DIR`` (the campaign's checkpoints, each evaluation's chunks, ``DIR/straightness/*.json``),
so a killed benchmark rerun resumes where it stopped. Writes ``DIR/results.md`` and ``DIR/fid_vs_nfe.png`` and ends
with one line of ``key=value`` figures: ``rf2_straighter`` (1 when 2-RF is straighter than 1-RF on every seed),
``rf2_vs_rf1_fid_1nfe`` (mean 2-RF / 1-RF FID at one step), ``pd_ratio_1nfe``, ``pd_ratio_2nfe`` (student FID / the
teacher's best), ``ratio_1nfe``, ``ratio_2nfe``, ``class_acc_1nfe``, ``wall_STAGE_s`` (each stage's training time),
``teacher_fill_speedup`` / ``teacher_fill_vs_balanced`` (with ``_lo`` / ``_hi``: 95% CIs): a progressive step on 2
pipeline ranks at M = 4 with its teacher in the bubbles vs inline and vs pre-computed (``benchmarks/teacher_fill.py``,
run here once and kept in ``DIR/teacher_fill.json``), ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NFES = [1, 2, 4, 8, 16, 32]
SEEDS = [0, 1, 2]
FULL = {"teacher": 3000, "pairs": 4096, "rf2": 1500, "pd": 600, "samples": 1000, "straight": 256, "few": 1000}
QUICK = {"teacher": 40, "pairs": 128, "rf2": 20, "pd": 10, "samples": 100, "straight": 32, "few": 10}
# the few-step students (issue 16), each from the teacher: stage_args and overrides (a campaign stage's body)
FEW = {
    # consistency distillation of the guided teacher (CFG 2 distilled in): Heun teacher steps on 16 uniform intervals
    "cd": "{stage: consistency, from: teacher, stage_args: {teacher_guidance: 2.0, steps: 16, solver: heun}}",
    # easy consistency tuning (iCT's recipe started from the teacher, no teacher at training time)
    "ect": ("{stage: consistency, from: teacher, stage_args: {teacher: '', grid: karras, steps: 10, steps_max: 80, "
            "target_ema: 0, loss: pseudo_huber, weight: inverse_step, t_sampling: lognormal, boundary: edm}}"),
    # distribution matching (DMD2): one-step generator, fake score 4 steps per generator step, real score at CFG 2
    "dmd": "{stage: dmd, from: teacher, stage_args: {teacher_guidance: 2.0, fake_updates: 4}}",
}
FEW_OPTIM = "optim.lr=1e-4, optim.warmup_steps=20, optim.schedule=constant"


def campaign_yaml(d: Path, data: dict, n: dict, few: list[tuple[str, int]] = ()) -> str:
    common = "[data.num_workers=1, eval.every=0, run.sample_every=0, run.log_every=50, run.progress=false]"
    pd = "diffusion.target=v, diffusion.weighting=truncated_snr"
    rf2 = "\n".join(f"  rf2_s{s}: {{stage: reflow, from: pairs, overrides: [run.steps={n['rf2']}, run.seed={s}, "
                    f"run.ckpt_every=500]}}" for s in SEEDS)
    return f"""# written by benchmarks/distill.py
dir: {d / "campaign"}
config: {REPO / "configs/demo.yaml"}
overrides: {common}
stages:
  teacher: {{overrides: [run.steps={n['teacher']}, run.ckpt_every=500, data.train={data['train']}]}}
  pairs: {{kind: pairs, from: teacher, count: {n['pairs']}, solver: euler, steps: 32, guidance: 2.0}}
{rf2}
  pd4: {{stage: progressive, from: teacher, stage_args: {{steps: 4, teacher_guidance: 2.0}},
        overrides: [run.steps={n['pd']}, run.ckpt_every=500, data.train={data['train']}, {pd}]}}
  pd2: {{stage: progressive, from: pd4, stage_args: {{steps: 2}},
        overrides: [run.steps={n['pd']}, run.ckpt_every=500, data.train={data['train']}, {pd}]}}
  pd1: {{stage: progressive, from: pd2, stage_args: {{steps: 1}},
        overrides: [run.steps={n['pd']}, run.ckpt_every=500, data.train={data['train']}, {pd}]}}
""" + "".join(few_stage(name, s, data, n) for name, s in few)


def few_stage(name: str, seed: int, data: dict, n: dict) -> str:
    """A few-step student's campaign stage: FEW[name] with the common overrides (seed s > 0: ``NAME_sS``)."""
    body = FEW[name][:-1]  # the mapping without its closing brace
    over = f"run.steps={n['few']}, run.ckpt_every=500, run.seed={seed}, data.train={data['train']}, {FEW_OPTIM}"
    return f"  {name if seed == 0 else f'{name}_s{seed}'}: {body}, overrides: [{over}]}}\n"


def run(args: list[str], log: Path, what: str | None = None) -> None:
    """Run ``args`` (output appended to ``log``; a failure ends the benchmark naming it), printing ``what`` (default:
    the difftrain subcommand) and the seconds it took."""
    t0 = time.time()
    with open(log, "a") as f:
        p = subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({p.returncode}); see {log}")
    print(f"  {what or 'difftrain ' + args[args.index('difftrain') + 1]} ... {time.time() - t0:.0f} s", flush=True)


def workdir(arg: str) -> tuple[Path, Path, dict]:
    """(DIR, its log.txt, the digits data set in DIR/data: written on the first run, found on a resumed one)."""
    from difftrain.data.demo import write_digits

    d = (REPO / arg).resolve() if not Path(arg).is_absolute() else Path(arg)
    d.mkdir(parents=True, exist_ok=True)
    data = ({"train": str(d / "data" / "train" / "{00000..00006}.tar")} if (d / "data" / "train").is_dir()
            else write_digits(d / "data", image_size=16, progress=False))
    return d, d / "log.txt", data


def torchrun(nproc: int, args: list[str], log: Path, what: str | None = None) -> None:
    """``args`` under torchrun: difftrain's subcommand and its arguments, or (with ``what``) a script and its."""
    run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
         *(args if what else ["-m", "difftrain", *args])], log, what)


def evaluate(d: Path, data: dict, n: dict, models: list[str], seed: int, tag: str, log: Path,
             samplers: list[str] | None = None, steps: list[int] | None = None) -> list[dict]:
    """One ``difftrain eval`` launch over ``models`` (each at its own sampler and steps unless given), cached in
    DIR/eval/TAG (rerun: chunks already sampled are read back)."""
    out = d / "eval" / tag
    want = len(models) * len(samplers or [None]) * len(steps or [None])
    done = out / "results.json"
    if not done.is_file() or len(json.loads(done.read_text())) != want:
        extra = (["--sampler", ",".join(samplers)] if samplers else []) + (
            ["--steps", ",".join(map(str, steps))] if steps else [])
        torchrun(2, ["eval", *[str(d / "campaign" / m) for m in models], "--ref", data["train"], "--ref-samples",
                     "1617", "--extractor", "digits", "--samples", str(n["samples"]), "--seed", str(seed),
                     "--out", str(out), *extra], log)
    return [{**r, "model": r["run"], "seed": seed} for r in json.loads(done.read_text())]


def heun_steps(nfe: int) -> int:
    from difftrain.diffusion.paths import RectifiedFlow
    from difftrain.eval.generator import count_nfe

    return max([s for s in range(1, nfe + 1) if count_nfe("heun", s, RectifiedFlow()) <= nfe], default=1)


def straightness(d: Path, model: str, n: dict, guidance: float) -> float:
    """Mean straightness of the model's sampling ODE (32 Euler steps, seed 0), cached in DIR/straightness/."""
    f = d / "straightness" / f"{model}.json"
    if f.is_file():
        return json.loads(f.read_text())["straightness"]
    import torch

    from difftrain.eval.generator import load_generator
    from difftrain.eval.straightness import model_straightness
    from difftrain.sampling import default_conditions, sample_shape

    g = load_generator(d / "campaign" / model, torch.device("cpu"))
    captions, labels = default_conditions(g.cond, n["straight"], g.cfg.run.sample_prompts, g.cfg.model.num_classes)
    s = model_straightness(g.model, g.diffusion, g.conditioner, n=n["straight"], shape=sample_shape(g.acfg),
                           steps=32, guidance=guidance, seed=0, device=g.device, captions=captions, labels=labels)
    value = float(s.double().mean())
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"model": model, "straightness": value, "n": n["straight"], "guidance": guidance}))
    return value


def stage_wall(d: Path, stage: str) -> float | None:
    """The stage's training wall time (the campaign record's ``wall_s``; None for stages trained before it kept one)."""
    try:
        return json.loads((d / "campaign" / stage / "campaign.json").read_text()).get("wall_s")
    except (OSError, ValueError):
        return None


def teacher_fill(d: Path, quick: bool) -> tuple[dict, str]:
    """The teacher in the pipeline's bubbles (``benchmarks/teacher_fill.py``: 2 pp ranks, M = 4, paired rounds):
    its figures and tables, kept in ``DIR/teacher_fill.json`` (delete it to measure again)."""
    cache = d / "teacher_fill.json"
    if not cache.exists():
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "teacher_fill.py")] + (["--quick"] * quick),
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()
        figures = {k: float(v) for k, v in (kv.split("=") for kv in out[-1].split())}
        tables = "\n".join(line for line in out[:-1] if line.startswith(("|", "##", "per micro-batch")))
        cache.write_text(json.dumps({"figures": figures, "tables": tables}))
    got = json.loads(cache.read_text())
    return got["figures"], got["tables"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="runs/bench_distill")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks every piece in a few minutes")
    a = ap.parse_args()
    n = QUICK if a.quick else FULL
    t0, load = time.time(), os.getloadavg()[0]
    d, log, data = workdir(a.dir)
    few = [(m, 0) for m in FEW]
    (d / "campaign.yaml").write_text(campaign_yaml(d, data, n, few))
    print(f"campaign {d / 'campaign.yaml'} (log {log})", flush=True)
    torchrun(2, ["campaign", str(d / "campaign.yaml"), "--skip-eval"], log)

    # the teacher's best: every sampler x NFE (seed 0; Heun at the steps whose NFE is closest from below)
    rows = evaluate(d, data, n, ["teacher"], 0, "teacher", log, ["euler", "dpmpp_2m"], NFES)
    rows += evaluate(d, data, n, ["teacher"], 0, "teacher_heun", log, ["heun"], sorted({heun_steps(k) for k in NFES}))
    best = min(rows, key=lambda r: r["fid"])
    rf1, rf2 = [], []
    for s in SEEDS:  # 1-RF and 2-RF at one Euler step, paired by seed (each at its own guidance)
        a_, b = evaluate(d, data, n, ["teacher", f"rf2_s{s}"], s, f"one_step_seed{s}", log, ["euler"], [1])
        rf1.append(a_)
        rf2.append(b)
    pd = {int(r["steps"]): r for r in evaluate(d, data, n, ["pd4", "pd2", "pd1"], 0, "progressive", log)}
    straight1 = straightness(d, "teacher", n, guidance=2.0)
    straight2 = [straightness(d, f"rf2_s{s}", n, guidance=1.0) for s in SEEDS]

    # the few-step students at NFE 1, 2, 4 (their own samplers; DMD's generator is one-step), seed 0; then the best
    # student at 1 and at 2 NFE (any method, progressive and 2-RF included) trained and sampled with seeds 1 and 2
    students = evaluate(d, data, n, [m for m in FEW if m != "dmd"], 0, "consistency", log, None, [1, 2, 4])
    students += evaluate(d, data, n, ["dmd"], 0, "dmd", log)
    candidates = students + list(pd.values()) + [r for r in rf2 if r["seed"] == 0]
    rf2_2 = evaluate(d, data, n, ["rf2_s0"], 0, "rf2_2nfe", log, ["euler"], [2])
    candidates += rf2_2
    best_at = {k: min((r for r in candidates if r["nfe"] == k), key=lambda r: r["fid"]) for k in (1, 2)}
    method = {k: r["model"].split("_s")[0] for k, r in best_at.items()}
    seeded: dict[int, list[dict]] = {}
    extra = sorted({(method[k], s) for k in (1, 2) for s in SEEDS[1:] if method[k] in FEW})
    if extra:
        (d / "campaign.yaml").write_text(campaign_yaml(d, data, n, few + extra))
        torchrun(2, ["campaign", str(d / "campaign.yaml"), "--skip-eval"], log)
    for k in (1, 2):
        r0 = best_at[k]
        runs = {s: (method[k] if s == 0 else f"{method[k]}_s{s}") for s in SEEDS}
        if method[k] == "rf2":
            runs = {s: f"rf2_s{s}" for s in SEEDS}
        if method[k] not in FEW and method[k] != "rf2":
            seeded[k] = [r0]  # a progressive round: one seed (each seed would retrain the chain of rounds)
            continue
        seeded[k] = [r0 if s == 0 else evaluate(d, data, n, [runs[s]], s, f"best{k}_seed{s}", log,
                                                [r0["sampler"]], [int(r0["steps"])])[0] for s in SEEDS]
    walls = {m: stage_wall(d, m) for m in ["teacher", "rf2_s0", "pd4", "pd2", "pd1", *FEW]}
    fill, fill_tables = teacher_fill(d, a.quick)

    lines = ["| model | sampler | NFE | seed | FID | KID | precision | recall | class acc |", "|---" * 9 + "|"]
    for r in rows + rf1 + rf2 + list(pd.values()) + rf2_2 + students + [r for k in (1, 2) for r in seeded[k][1:]]:
        acc = r.get("class_acc", float("nan"))
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['seed']} | {r['fid']:.2f} | {r['kid']:.1f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {acc:.3f} |")
    lines += ["", f"teacher's best: {best['sampler']} at NFE {best['nfe']}, FID {best['fid']:.2f}",
              f"straightness: 1-RF {straight1:.4g}; 2-RF " + ", ".join(f"{v:.4g}" for v in straight2)]
    for k in (1, 2):
        fids = [r["fid"] for r in seeded[k]]
        lines.append(f"best {k}-NFE student: {method[k]} ({best_at[k]['sampler']}), FID "
                     + ", ".join(f"{v:.2f}" for v in fids) + f" over {len(fids)} seed(s): "
                     f"{statistics.mean(fids) / best['fid']:.3f}x the teacher's best")
    lines.append("training wall time per stage (s, 2 ranks): "
                 + ", ".join(f"{m} {w:.0f}" for m, w in walls.items() if w is not None))
    lines += ["", fill_tables]
    (d / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    from difftrain.eval.plots import plot_fid_vs_nfe

    plot_fid_vs_nfe(rows + rf2 + list(pd.values()) + students, d / "fid_vs_nfe.png",
                    title="digits: teacher, 2-RF, progressive, consistency, DMD",
                    series=lambda r: f"{r['model'].split('_s')[0]} / {r['sampler']}")
    ratio = statistics.mean(b["fid"] / a_["fid"] for a_, b in zip(rf1, rf2))
    figures = {
        "teacher_best_fid": best["fid"], "teacher_best_nfe": best["nfe"],
        "rf1_fid_1nfe": statistics.mean(r["fid"] for r in rf1), "rf2_fid_1nfe": statistics.mean(r["fid"] for r in rf2),
        "rf2_vs_rf1_fid_1nfe": ratio, "rf2_better_1nfe_seeds": sum(b["fid"] < a_["fid"] for a_, b in zip(rf1, rf2)),
        "rf1_straightness": straight1, "rf2_straightness": statistics.mean(straight2),
        "rf2_straighter": int(all(v < straight1 for v in straight2)),
        **{f"pd{k}_fid": r["fid"] for k, r in pd.items()},
        "pd_ratio_4nfe": pd[4]["fid"] / best["fid"], "pd_ratio_2nfe": pd[2]["fid"] / best["fid"],
        "pd_ratio_1nfe": pd[1]["fid"] / best["fid"],
        **{f"{r['model']}_fid_{r['nfe']}nfe": r["fid"] for r in students},
        "best_1nfe": method[1], "best_2nfe": method[2],
        "ratio_1nfe": statistics.mean(r["fid"] for r in seeded[1]) / best["fid"],
        "ratio_2nfe": statistics.mean(r["fid"] for r in seeded[2]) / best["fid"],
        "class_acc_1nfe": statistics.mean(r.get("class_acc", float("nan")) for r in seeded[1]),
        "class_acc_2nfe": statistics.mean(r.get("class_acc", float("nan")) for r in seeded[2]),
        **{f"wall_{m}_s": w for m, w in walls.items() if w is not None},
        **{k: v for k, v in fill.items() if k.startswith("teacher_fill")},
        "quick": int(a.quick), "load_avg_start": load, "wall_s": time.time() - t0,
    }
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
