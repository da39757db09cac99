"""Quantising the digits models (issue 18): full precision vs post-training quantisation (PTQ) vs quantisation-aware
training (QAT), plain and timestep-aware, at W8A8 / W4A8 / W4A4 with static activation step sizes, and torchao's
dynamic per-token activations as a row of their own; on the digits teacher and on a 2-step distilled student.

    python benchmarks/qat.py                      # the full run (resumable; 56 min here: 2313 s + 1024 s)
    python benchmarks/qat.py --quick              # every piece at toy size (594 s here): checks the script

Everything is the real CLI under torchrun (2 gloo processes). One campaign (``difftrain campaign``,
docs/CAMPAIGNS.md) trains:

* ``teacher``: configs/demo.yaml (the text-conditional DiT-T/2, rectified flow, CFG 2) for 600 steps;
* ``pd2``: a 2-step progressive student of it, in one round of 300 steps (``stage: progressive, steps: 2``: the
  student's DDIM step does two of the guided teacher's at CFG 2; v target, truncated-SNR weighting, as
  benchmarks/distill.py's rounds). One round is the fastest usable 2-step student here: distill.py's progressive
  chain (8 -> 4 -> 2, 600 steps a round) reached 1.17x the teacher's best FID at 2 steps, and the teacher at 4 Euler
  steps is already within 1.06x of its 32 (docs/BENCHMARKS.md, issue 15); consistency distillation (issue 16) is
  better at 2 NFE but samples stochastically, and the trajectory stage replaces such a sampler by DDIM, which is not
  how it serves.
* for each of the two full-precision (FP) models and each row of :data:`ROWS`, a ``trajectory`` stage from it
  (EfficientDM's data-free distillation along the FP model's own sampling trajectories,
  ``difftrain/train/stages/trajectory.py``) with ``adapt: [{kind: qat, ...}]`` (``difftrain/quant/qat.py``):

  - PTQ: ``optim.lr=0`` for ``calib`` (8) steps with ``calibrate: calib``: the weights' min/max step sizes and the
    activation step sizes calibrated on the trajectories (nothing trains);
  - QAT: the same calibration, then ``qat`` (120) steps of the whole model and its step sizes at batch 32 (AdamW,
    lr ``QAT_LR`` = 1e-4 constant after 20 warmup steps, EMA 0.95; the rate was not tuned), matching the FP model's
    outputs along its trajectories;
  - static activations (``ActQuant``, symmetric per tensor) plain (``t_intervals: 1``) or timestep-aware
    (``_ta``: ``t_intervals`` = the sampler's step count, one step size per step of its grid, EfficientDM's TALSQ);
    weights per output channel (LSQ);
  - ``_dyn``: torchao's ``int8_dynamic_int4_weight`` scheme (``difftrain/quant/torchao_scheme.py``: int4 weights
    per group of 32, int8 activations per token from each token's min / max at every forward), kept apart: it has
    no activation step size to calibrate or make timestep-aware.

  Each trajectory runs the FP model's own sampling: the teacher's dpmpp_2m at 8 steps (unguided trajectories;
  the quantised model samples at the teacher's CFG 2 like the teacher, its conditional and null outputs both
  matched, the null ones through the data's caption dropout), the student's DDIM at 2 steps.

``difftrain eval`` scores 500 samples of every model at its FP model's sampler and steps (teacher:
dpmpp_2m 8, CFG 2; pd2: DDIM 2, no CFG) in the built-in digits classifier's features against the 1617 training
images (FID and class accuracy), seed 0 for the grid. The teacher's headline rows, timestep-aware QAT W4A8 and
timestep-aware PTQ W4A8 (the same calibration and step-size grid, so their ratio is what training adds), are
trained and sampled with seeds 1 and 2 as well, and the FP teacher sampled with them: ratios to FP are paired by
seed (geometric mean, 95% t-interval of the log ratios).

Weight bytes: ``difftrain export`` of the teacher's QAT W4A8 and W8A8 runs writes ``DIR/quantized/`` (the integer
export, ``difftrain/quant/export.py``: packed integers + float32 step sizes); its ``difftrain.json`` counts the
quantised layers' integer + scale bytes against the same layers' float32 weights. CPU latency: one forward at batch
16 (1 thread), median of ``lat_reps`` interleaved repeats (the order rotating), of the FP teacher; the converted
LSQ W4A8 and W8A8 runs (``load_run``: folded weights s · (k − z) in float, fake-quantised activations); the served
integer export (``quant/serve.py``: integers in memory, dequantised at every forward); and torchao's CPU paths on
the same layers of the teacher's architecture: ``Int8DynamicActivationInt8WeightConfig`` and the ``_dyn`` row's
``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))``. A profile of one forward of each tells which run
integer matmul kernels (``aten::_int_mm``, ``*int8pack_mm``, ``*int4pack_mm``): the results say so per model.

Every result is kept under ``DIR`` (the campaign's runs, each evaluation's chunks, the exports, ``latency.json``),
so a killed benchmark rerun resumes where it stopped. Writes ``DIR/results.md`` and ``DIR/fid_by_bits.png`` and
ends with one line of ``key=value`` figures: ``qat_w8a8_ratio`` (teacher QAT W8A8, plain, / FP FID, seed 0),
``qat_w4a8_ratio`` (timestep-aware QAT W4A8 / FP, mean of the paired seeds; ``_lo`` / ``_hi`` the 95% CI),
``ptq_w4a8_ratio`` (timestep-aware PTQ W4A8 / FP, the same), ``w4_size_ratio`` (float32 bytes / W4 bytes of the
quantised layers), ``w8_size_ratio``, then ``{fp}_{row}_fid`` / ``_acc`` / ``_ratio`` per row, latencies and walls.

Budget, on paper from the --quick run and a 40-step probe of a QAT stage, at the load they saw (load average 4-7 on
the 2 cores, other jobs running): teacher 600 steps x ~0.6 s (its 20 quick steps: 12.5 s) ~ 360 s; pd2 300 x ~1 s
~ 300 s; QAT on the teacher 8 runs x 128 steps x 1.45 s (the probe: 22 samples/s at batch 32 along 8-step dpmpp_2m
trajectories) ~ 1490 s; QAT on pd2 6 x 128 x ~1.1 s (its quick steps took ~0.75x the teacher rows') ~ 850 s; PTQ 14
runs x 8 steps ~ 180 s; ~6 s per stage around its training (30 stages) ~ 200 s; evaluation: ~50 s per teacher
model at 500 samples (the quick: ~20 s per 100 samples on one rank) x 19 + ~7 s x 13 for pd2 ~ 1040 s; exports and
latency ~ 60 s. About 4500 s (75 min); less on an idle machine. Measured on 2026-12-07: the campaign 2313 s, then
evaluation, exports and latency 1024 s (docs/BENCHMARKS.md); a quick run took 594 s end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]
from distill import evaluate, run, stage_wall, torchrun, workdir  # noqa: E402  (the sibling benchmarks' helpers)
from finetune import mean_ci, paired_ratio  # noqa: E402

SEEDS = [0, 1, 2]
FULL = {"teacher": 600, "pd": 300, "calib": 8, "qat": 120, "batch": 32, "samples": 500, "lat_reps": 20}
QUICK = {"teacher": 20, "pd": 4, "calib": 2, "qat": 4, "batch": 16, "samples": 100, "lat_reps": 3}
QAT_LR = 1e-4
# the FP models: their sampler and steps (the trajectories', the evaluation's, t_intervals of the _ta rows) and the
# overrides their trajectory stages need (a progressive student predicts v: the student must predict the same)
FP = {"teacher": {"sampler": "dpmpp_2m", "steps": 8, "over": []},
      "pd2": {"sampler": "ddim", "steps": 2, "over": ["diffusion.target=v"]}}
# row -> (method, weight bits, activation bits, activations: static | ta (timestep-aware static) | dyn (torchao))
ROWS = {
    "ptq_w8a8": ("ptq", 8, 8, "static"), "ptq_w8a8_ta": ("ptq", 8, 8, "ta"),
    "ptq_w4a8": ("ptq", 4, 8, "static"), "ptq_w4a8_ta": ("ptq", 4, 8, "ta"), "ptq_w4a4_ta": ("ptq", 4, 4, "ta"),
    "qat_w8a8": ("qat", 8, 8, "static"), "qat_w8a8_ta": ("qat", 8, 8, "ta"),
    "qat_w4a8": ("qat", 4, 8, "static"), "qat_w4a8_ta": ("qat", 4, 8, "ta"), "qat_w4a4_ta": ("qat", 4, 4, "ta"),
    "ptq_w4a8_dyn": ("ptq", 4, 8, "dyn"), "qat_w4a8_dyn": ("qat", 4, 8, "dyn"),
}
SEEDED = ["qat_w4a8_ta", "ptq_w4a8_ta"]  # the teacher's rows trained and sampled with every seed
DYN = "{kind: qat, scheme: int8_dynamic_int4_weight, weight_bits: 4, act_bits: 8, act_symmetric: false, " \
      "granularity: group, group_size: 32}"
INT_KERNELS = ("_int_mm", "int8pack_mm", "int4pack_mm", "quantized::")  # profiler names of integer matmuls


def qat_entry(row: str, fp: str, n: dict) -> str:
    """The row's ``adapt`` entry (YAML flow mapping)."""
    _, w, a, acts = ROWS[row]
    if acts == "dyn":
        return DYN
    k = FP[fp]["steps"] if acts == "ta" else 1
    return f"{{kind: qat, weight_bits: {w}, act_bits: {a}, t_intervals: {k}, calibrate: {n['calib']}}}"


def stage_name(fp: str, row: str, seed: int = 0) -> str:
    return f"{fp}_{row}" + (f"_s{seed}" if seed else "")


def campaign_yaml(d: Path, data: dict, n: dict, rows: list[str]) -> str:
    """The campaign: the teacher, its 2-step student and every (FP model, row[, seed]) trajectory stage."""
    common = "[data.num_workers=1, eval.every=0, run.sample_every=0, run.log_every=50, run.progress=false]"
    out = [f"  teacher: {{overrides: [run.steps={n['teacher']}, run.ckpt_every=500, data.train={data['train']}]}}",
           f"  pd2: {{stage: progressive, from: teacher, stage_args: {{steps: 2, teacher_guidance: 2.0}}, overrides: "
           f"[run.steps={n['pd']}, run.ckpt_every=500, data.train={data['train']}, diffusion.target=v, "
           "diffusion.weighting=truncated_snr]}"]
    for fp, how in FP.items():
        for row in rows:
            for s in (SEEDS if fp == "teacher" and row in SEEDED else [0]):
                ptq = ROWS[row][0] == "ptq"
                steps = n["calib"] + (0 if ptq else n["qat"])
                optim = (["optim.lr=0"] if ptq else
                         [f"optim.lr={QAT_LR}", "optim.warmup_steps=20", "optim.schedule=constant"])
                over = [f"run.steps={steps}", f"run.seed={s}", "run.ckpt_every=0", f"data.train={data['train']}",
                        f"data.batch_size={n['batch']}", "optim.ema_decay=0.95", *optim, *how["over"]]
                out.append(f"  {stage_name(fp, row, s)}: {{stage: trajectory, from: {fp}, stage_args: {{steps: "
                           f"{how['steps']}, sampler: {how['sampler']}}}, overrides: [" + ", ".join(over)
                           + f", \"adapt=[{qat_entry(row, fp, n)}]\"]}}")
    return f"""# written by benchmarks/qat.py
dir: {d / "campaign"}
config: {REPO / "configs/demo.yaml"}
overrides: {common}
stages:
""" + "\n".join(out) + "\n"


def export(d: Path, stage: str, log: Path) -> dict:
    """``difftrain export`` of a QAT run into DIR/export/STAGE (once): its ``difftrain.json``'s ``quantized`` summary
    and the integer file's size."""
    out = d / "export" / stage
    meta = out / "difftrain.json"
    if not meta.is_file():
        run([sys.executable, "-m", "difftrain", "export", str(d / "campaign" / stage), "--out", str(out)], log)
    q = json.loads(meta.read_text())["quantized"]
    return {**q, "file_bytes": (out / q["folder"] / "model.safetensors").stat().st_size, "dir": str(out)}


# ---------------------------------------------------------------------------------------------------------- latency
def _torchao_copy(model, config):
    """A copy of ``model`` whose Linear layers but the input / output ones (qat's EDGES) torchao quantises with
    ``config`` (its CPU path; weight values do not change the time)."""
    import copy
    import re

    from torch import nn
    from torchao.quantization import quantize_

    from difftrain.quant.qat import EDGES

    m = copy.deepcopy(model)
    quantize_(m, config, filter_fn=lambda mod, name: isinstance(mod, nn.Linear) and not re.fullmatch(EDGES, name))
    return m


def latency(d: Path, n: dict, log: Path) -> dict:
    """The latency figures (:func:`measure_latency`, in a process of its own: one thread, its profiler's output in
    the log), kept in DIR/latency.json (delete it to measure again)."""
    cache = d / "latency.json"
    if not cache.is_file():
        run([sys.executable, str(Path(__file__).resolve()), "--latency", str(d), "--lat-reps", str(n["lat_reps"])],
            log, "latency (CPU, 1 thread)")
    return json.loads(cache.read_text())


def measure_latency(d: Path, reps: int) -> None:
    """Median forward time (ms) at batch 16 of the FP teacher and its quantised forms, interleaved (1 thread); and
    whether a profile of one forward shows an integer matmul kernel. Writes DIR/latency.json."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    from difftrain.eval.generator import load_run
    from difftrain.quant.qat import QATArgs
    from difftrain.quant.serve import load_quantized
    from difftrain.quant.torchao_scheme import base_config
    from difftrain.sampling import sample_shape

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    camp = d / "campaign"
    g = load_run(camp / "teacher", cpu)
    dyn = QATArgs(weight_bits=4, act_bits=8, act_symmetric=False, granularity="group", group_size=32,
                  scheme="int8_dynamic_int4_weight")
    models = {
        "fp32": (g.model, "float32 matmuls"),
        "lsq_w4a8_ta converted": (load_run(camp / "teacher_qat_w4a8_ta", cpu).model,
                                  "fake: weights folded to s·(k−z) in float32, activations fake-quantised"),
        "lsq_w8a8 converted": (load_run(camp / "teacher_qat_w8a8", cpu).model,
                               "fake: weights folded to s·(k−z) in float32, activations fake-quantised"),
        "integer export w4a8_ta (serve)": (load_quantized(d / "export" / "teacher_qat_w4a8_ta", cpu),
                                           "int4 in memory, dequantised at every forward; float32 matmuls"),
        "torchao int8 dynamic (W8A8)": (_torchao_copy(g.model, Int8DynamicActivationInt8WeightConfig()),
                                        "torchao Int8DynamicActivationInt8WeightConfig"),
        "torchao int8 dyn + int4 weight (W4A8 dyn)": (
            _torchao_copy(g.model, base_config(dyn)),
            "torchao Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))"),
    }
    shape = sample_shape(g.acfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, *shape, generator=gen)
    t = torch.full((16,), 0.5)
    cond = g.conditioner([f"a handwritten digit {i % 10}" for i in range(16)], None)
    names = list(models)
    times = {k: [] for k in names}
    with torch.no_grad():
        for k in names:  # warm up
            models[k][0].eval()(x, t, cond)
        for r in range(reps):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                models[k][0](x, t, cond)
                times[k].append(time.perf_counter() - t0)
        kernels = {}
        for k in names:
            with profile(activities=[ProfilerActivity.CPU]) as p:
                models[k][0](x, t, cond)
            kernels[k] = sorted({e.key for e in p.key_averages() if any(s in e.key for s in INT_KERNELS)})
    out = {k: {"ms": statistics.median(times[k]) * 1e3, "what": models[k][1], "int_kernels": kernels[k],
               "vs_fp32": statistics.median(times[k]) / statistics.median(times["fp32"])} for k in names}
    (d / "latency.json").write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------------------------------------- plot
def plot(fid: dict, fp_fid: dict, path: Path, rows: list[str]) -> None:
    """FID per row, grouped by bits (one panel per FP model), the FP model's FID as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in rows:
        g = f"W{ROWS[r][1]}A{ROWS[r][2]}" + (" dyn" if ROWS[r][3] == "dyn" else "")
        if g not in groups:
            groups.append(g)
    kinds = [("ptq", "static", "PTQ"), ("ptq", "ta", "PTQ t-aware"), ("qat", "static", "QAT"),
             ("qat", "ta", "QAT t-aware"), ("ptq", "dyn", "PTQ dyn (torchao)"), ("qat", "dyn", "QAT dyn (torchao)")]
    fig, axes = plt.subplots(1, len(FP), figsize=(5.5 * len(FP), 3.8), dpi=120)
    width = 0.8 / 4
    for ax, fp in zip(axes, FP):
        for j, (meth, acts, label) in enumerate(kinds):
            xs, ys = [], []
            for gi, grp in enumerate(groups):
                for r in rows:
                    m, w, a, ac = ROWS[r]
                    if (m, ac) == (meth, acts) and f"W{w}A{a}" == grp.split()[0] and (ac == "dyn") == grp.endswith(
                            "dyn") and (fp, r) in fid:
                        xs.append(gi + (j % 4 if acts != "dyn" else j - 4) * width - 0.3)
                        ys.append(fid[(fp, r)])
            if xs:
                ax.bar(xs, ys, width, label=label, color=f"C{j}")
        ax.axhline(fp_fid[fp], color="gray", linestyle="--", label=f"FP ({fp_fid[fp]:.1f})")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("FID (digits classifier features)")
        ax.set_title(f"{fp} ({FP[fp]['sampler']}, {FP[fp]['steps']} steps), seed 0")
        if max(v for (f, _), v in fid.items() if f == fp) > 10 * fp_fid[fp]:
            ax.set_yscale("log")  # a collapsed row (W4A4 PTQ) would flatten the others
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(figures: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="runs/bench_qat")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks every piece in a few minutes")
    ap.add_argument("--latency", help=argparse.SUPPRESS)  # the latency worker: DIR
    ap.add_argument("--lat-reps", type=int, default=FULL["lat_reps"], help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"a comma-separated subset of {', '.join(ROWS)} "
                    f"(the headline rows {', '.join(SEEDED)}, qat_w8a8 and qat_w8a8_ta are always in)")
    a = ap.parse_args()
    if a.latency:
        return measure_latency(Path(a.latency), a.lat_reps)
    n = QUICK if a.quick else FULL
    asked = a.rows.split(",")
    if any(r not in ROWS for r in asked):
        sys.exit(f"--rows {a.rows}: each must be one of {', '.join(ROWS)}")
    need = [*SEEDED, "qat_w8a8", "qat_w8a8_ta"]
    rows = [r for r in ROWS if r in asked or r in need]
    t0, load = time.time(), os.getloadavg()[0]
    d, log, data = workdir(a.dir)
    (d / "campaign.yaml").write_text(campaign_yaml(d, data, n, rows))
    print(f"campaign {d / 'campaign.yaml'} (log {log})", flush=True)
    torchrun(2, ["campaign", str(d / "campaign.yaml"), "--skip-eval"], log)

    # the grid: seed 0, each FP model with its rows at its sampler and steps
    res: dict[tuple[str, str, int], dict] = {}
    for fp, how in FP.items():
        models = [fp] + [stage_name(fp, r) for r in rows]
        got = evaluate(d, data, n, models, 0, f"{fp}_seed0", log, [how["sampler"]], [how["steps"]])
        for r in got:
            res[(fp, r["model"][len(fp) + 1:] if r["model"] != fp else "fp", 0)] = r
    for s in SEEDS[1:]:  # the teacher's headline rows, trained and sampled with seed s
        models = ["teacher"] + [stage_name("teacher", r, s) for r in SEEDED]
        got = evaluate(d, data, n, models, s, f"teacher_seed{s}", log, [FP["teacher"]["sampler"]],
                       [FP["teacher"]["steps"]])
        for r in got:
            res[("teacher", "fp" if r["model"] == "teacher" else r["model"][len("teacher_"):-len(f"_s{s}")], s)] = r
    sizes = {b: export(d, f"teacher_qat_w{b}a8" + ("_ta" if b == 4 else ""), log) for b in (4, 8)}
    lat = latency(d, n, log)

    walls = {stage_name(fp, r): stage_wall(d, stage_name(fp, r)) for fp in FP for r in rows}
    walls.update({"teacher": stage_wall(d, "teacher"), "pd2": stage_wall(d, "pd2")})
    lines = ["| FP model | row | method | W | A | activations | t-intervals | sampler | steps | CFG | seed | FID | "
             "FID / FP | KID | precision | recall | class acc | train wall s |", "|---" * 18 + "|"]
    figures: dict = {}
    for (fp, row, s), r in res.items():
        ratio = r["fid"] / res[(fp, "fp", s)]["fid"]
        m, w, ab, acts = ROWS[row] if row != "fp" else ("fp", 32, 32, "float")
        k = FP[fp]["steps"] if acts == "ta" else (1 if acts == "static" else "-")
        wall = walls.get(stage_name(fp, row) if row != "fp" else fp)
        lines.append(f"| {fp} | {row} | {m} | {w} | {ab} | {acts} | {k} | {r['sampler']} | {r['steps']} | "
                     f"{r.get('guidance', float('nan')):g} | {s} | {r['fid']:.2f} | {ratio:.3f} | {r['kid']:.1f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r.get('class_acc', float('nan')):.3f} | "
                     f"{'-' if wall is None or s else f'{wall:.0f}'} |")
        if s == 0:
            figures.update({f"{fp}_{row}_fid": r["fid"], f"{fp}_{row}_acc": r.get("class_acc", float("nan")),
                            **({f"{fp}_{row}_ratio": ratio} if row != "fp" else {})})
    # the headline: paired by seed on the teacher
    fp_seeds = [res[("teacher", "fp", s)]["fid"] for s in SEEDS]
    lines += ["", "| teacher, over seeds 0-2 | FID (mean, 95% CI) | FID / FP (paired, 95% CI) | class acc |",
              "|---" * 4 + "|"]
    head = {}
    for row in ["fp", *SEEDED]:
        f = [res[("teacher", row, s)]["fid"] for s in SEEDS]
        mu = mean_ci(f)
        ra = paired_ratio(f, fp_seeds)
        acc = statistics.mean(res[("teacher", row, s)].get("class_acc", float("nan")) for s in SEEDS)
        head[row] = ra
        lines.append(f"| {row} | {mu[0]:.2f} [{mu[1]:.2f}, {mu[2]:.2f}] | {ra[0]:.3f} [{ra[1]:.3f}, {ra[2]:.3f}] | "
                     f"{acc:.3f} |")
    lines += ["", "| export (teacher) | quantised layers | integer + scale bytes | float32 bytes of the same layers | "
              "ratio | quantized/model.safetensors bytes |", "|---" * 6 + "|"]
    for b, q in sizes.items():
        lines.append(f"| qat_w{b}a8{'_ta' if b == 4 else ''} | {q['layers']} | {q['weight_bytes']:,} | "
                     f"{q['float32_weight_bytes']:,} | {q['float32_weight_bytes'] / q['weight_bytes']:.2f}x | "
                     f"{q['file_bytes']:,} |")
    lines += ["", "| model (teacher, CPU, batch 16, 1 thread) | forward ms (median) | / fp32 | integer matmul kernel "
              "(profiled) | what runs |", "|---" * 5 + "|"]
    for k, v in lat.items():
        kernel = ", ".join(v["int_kernels"]) or ("-" if k == "fp32" else "none: fakes it")
        lines.append(f"| {k} | {v['ms']:.1f} | {v['vs_fp32']:.2f}x | {kernel} | {v['what']} |")
    real = [k for k, v in lat.items() if v["int_kernels"]]
    lines += ["", f"Integer math on this CPU: {', '.join(real) or 'none'} (integer matmul kernels in its profile); "
              "every other quantised path dequantises and multiplies in float32, i.e. fakes the integer math (its "
              "integers save memory and bytes on disk, not time)."]
    (d / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot({(fp, r): v["fid"] for (fp, r, s), v in res.items() if s == 0 and r != "fp"},
         {fp: res[(fp, "fp", 0)]["fid"] for fp in FP}, d / "fid_by_bits.png", rows)
    tail = {"qat_w8a8_ratio": figures["teacher_qat_w8a8_ratio"],
            "qat_w4a8_ratio": head["qat_w4a8_ta"][0], "qat_w4a8_ratio_lo": head["qat_w4a8_ta"][1],
            "qat_w4a8_ratio_hi": head["qat_w4a8_ta"][2],
            "ptq_w4a8_ratio": head["ptq_w4a8_ta"][0], "ptq_w4a8_ratio_lo": head["ptq_w4a8_ta"][1],
            "ptq_w4a8_ratio_hi": head["ptq_w4a8_ta"][2],
            "w4_size_ratio": sizes[4]["float32_weight_bytes"] / sizes[4]["weight_bytes"],
            "w8_size_ratio": sizes[8]["float32_weight_bytes"] / sizes[8]["weight_bytes"]}
    lat_fig = {"lat_" + k.split(" (")[0].replace(" ", "_").replace("+", "").replace("__", "_") + "_ms": v["ms"]
               for k, v in lat.items()}
    wall_fig = {f"wall_{k}_s": v for k, v in walls.items() if v is not None and k in ("teacher", "pd2")}
    print(fmt({**tail, **figures, **lat_fig, **wall_fig, "quick": int(a.quick), "load_avg_start": load,
               "wall_s": time.time() - t0}))


if __name__ == "__main__":
    main()
