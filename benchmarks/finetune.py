"""Fine-tuning the digits model to a style it has not seen (bold strokes): full fine-tuning vs LoRA (r = 4, 16, 64)
vs DiffFit, in FID, class accuracy, trainable parameters, per-rank gradient + optimizer bytes and step time.

    python benchmarks/finetune.py                  # the full run (resumable; ~28 min on 2 shared cores,
                                                   # + ~13 min for the ControlNet)
    python benchmarks/finetune.py --quick          # every piece at toy size (6 min, + ~7 for the ControlNet's
                                                   # evaluation: 2 x 180 samples at 25 steps): checks the script
    python benchmarks/finetune.py --dir runs/bench_finetune_400 --base runs/bench_finetune/campaign/base \
        --methods full,lora4 --ft-steps 400 --seeds 2   # longer fine-tuning from the same base
    python benchmarks/finetune.py --methods controlnet  # the base and the ControlNet only (~20 min)

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
  Xie et al. 2023; lr 1e-3);
* ``lora4allmax``: ``lora4all`` at lr 1e-2: the headline LoRA (:data:`HEADLINE`);
* ``lora4hi`` / ``lora4max`` / ``lora4x3``: ``lora4`` at lr 3e-3 / 1e-2 / 3e-2 (only when ``--methods`` names them).

The rates were not tuned: the adapters at 5x full fine-tuning's, as parameter-efficient methods usually run higher.

``controlnet`` (issue 17's class-match test) fine-tunes the same base, once (seed 0), with :data:`CONTROLNET`:
``adapt: [{kind: controlnet}]`` (PixArt-δ's branch, ``difftrain/finetune/controlnet.py``) on the *plain* training
split with ``data.control: edges`` (the Sobel edge map of each training image, computed by the loader after its crop
and flip) and captions dropped half the time, as ControlNet's training replaces 50% of the prompts with empty
strings so the branch learns the content of the control image (Zhang et al. 2023, arXiv 2302.05543, Sec. 3.4); the
demo config's 0.1 keeps the empty prompt in distribution too, but gives the branch few steps where only the control
tells the digit. :func:`controlnet_match` then samples the run in-process (``load_run``, as ``difftrain sample``
serves it), one sample per plain held-out image, with an *empty* prompt and the run's sampler, steps and CFG scale:
with that image's edge map (computed by the loader's own ``apply_control``, encoded as the trainer encodes it) at
scale 1, and without a control image; the plain digits classifier labels every sample, and
``controlnet_class_match`` (``_off``) is the fraction whose label is the held-out image's (~0.1 by chance).

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
line of ``key=value`` figures: ``lora_vs_full_fid`` (the paired ratio of LoRA's FID to full fine-tuning's for the
headline LoRA :data:`HEADLINE`, r = 4 within the issue's 5% of trainable parameters; ``lora{r}_vs_full_fid``
for every rank, with ``_lo`` / ``_hi``: 95% t-intervals over the seeds), ``lora_param_pct``,
``lora_vs_full_optim_mem`` (the ratio of the measured per-rank gradient + optimizer bytes), ``controlnet_class_match``
and ``controlnet_class_match_off`` (with and without the control image; ``DIR/controlnet_eval.json``, the grid
``DIR/controlnet_samples.png``), per-method FID, class accuracy, trainable %, bytes and step time. ``--methods
controlnet`` runs the base and the ControlNet only (and prints only their figures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]
from distill import run, torchrun  # noqa: E402  (the sibling benchmark's launchers)
SEEDS = [0, 1, 2]
FULL = {"base": 400, "ft": 100, "samples": 500, "steps": 12, "rounds": 10, "controlnet": 600}
QUICK = {"base": 20, "ft": 4, "samples": 100, "steps": 4, "rounds": 2, "controlnet": 4}
# method -> its fine-tuning overrides (on top of COMMON_FT)
METHODS = {
    "full": ["optim.lr=2e-4"],
    "lora4": ["adapt=[{kind: lora, rank: 4}]", "optim.lr=1e-3"],
    "lora16": ["adapt=[{kind: lora, rank: 16}]", "optim.lr=1e-3"],
    "lora64": ["adapt=[{kind: lora, rank: 64}]", "optim.lr=1e-3"],
    # r = 4 on every linear, the conditioning paths too (caption cross-attention, the timestep/modulation MLP)
    "lora4all": ["adapt=[{kind: lora, rank: 4, targets: [attn, cross_attn, mlp, modulation]}]", "optim.lr=1e-3"],
    "difffit": ["adapt=[{kind: difffit}]", "optim.lr=1e-3"],
    # the headline LoRA at higher rates (an adapter's few weights move slowly at full fine-tuning's rate x 5)
    "lora4hi": ["adapt=[{kind: lora, rank: 4}]", "optim.lr=3e-3"],
    "lora4max": ["adapt=[{kind: lora, rank: 4}]", "optim.lr=1e-2"],
    "lora4x3": ["adapt=[{kind: lora, rank: 4}]", "optim.lr=3e-2"],
    "lora4allmax": ["adapt=[{kind: lora, rank: 4, targets: [attn, cross_attn, mlp, modulation]}]", "optim.lr=1e-2"],
}
RATE_SWEEP = ("lora4hi", "lora4max", "lora4x3")  # run when named in --methods only
LORA_RANKS = [4, 16, 64]
# the headline LoRA: r = 4 on every linear of the blocks at lr 1e-2 (3.8% trainable parameters on DiT-T/2, within the
# issue's 5%; the best of the rate sweep and targets measured, docs/BENCHMARKS.md); lora4, then any LoRA, without it
HEADLINE = "lora4allmax"
COMMON_FT = ["data.batch_size=32", "optim.warmup_steps=10", "optim.schedule=constant", "optim.ema_decay=0.95"]
# the ControlNet's fine-tuning overrides (on top of COMMON_FT; on the plain training split, seed 0)
CONTROLNET = ["adapt=[{kind: controlnet}]", "data.control=edges", "data.caption_dropout=0.5", "optim.lr=1e-3"]


def campaign_yaml(d: Path, data: dict, n: dict, methods: list[str], base: str = "", controlnet: bool = False) -> str:
    """The campaign: the base (unless ``base`` names a trained run), every method x seed fine-tuned from it on the
    bold digits and (``controlnet``) the ControlNet on the plain digits' edge maps."""
    common = "[data.num_workers=1, eval.every=0, run.sample_every=0, run.log_every=25, run.progress=false]"
    origin = [f"init_from={base}@ema"] if base else []

    def stage(name: str, steps: int, seed: int, train: str, overrides: list[str]) -> str:
        return (f"  {name}: {{{'' if base else 'from: base, '}overrides: [run.steps={steps}, run.seed={seed}, "
                f"run.ckpt_every=0, data.train={train}, " + ", ".join(f'"{o}"' for o in origin + overrides) + "]}\n")

    stages = "".join(stage(f"{m}_s{s}", n["ft"], s, data["bold"]["train"], COMMON_FT + METHODS[m])
                     for s in SEEDS for m in methods)
    if controlnet:
        stages += stage("controlnet", n["controlnet"], 0, data["plain"]["train"], COMMON_FT + CONTROLNET)
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


def controlnet_match(d: Path, data: dict, run_dir: Path, grid_n: int = 10) -> dict:
    """Class match of the ControlNet run ``run_dir``: one sample per plain held-out image, empty prompt, the run's
    sampler, steps and CFG scale (sampling seed 0), with that image's control image at scale 1 and without any;
    the plain digits classifier labels them. Cached in DIR/controlnet_eval.json under the run's weights'
    fingerprint; writes DIR/controlnet_samples.png (one column per digit 0 .. ``grid_n`` - 1, its first held-out
    image; rows: the control image, the sample with it, the sample without)."""
    import numpy as np
    import torch

    from difftrain.data.control import apply_control, check_control
    from difftrain.data.images import to_unit
    from difftrain.eval.extractors import build_extractor
    from difftrain.eval.generator import load_run
    from difftrain.eval.reference import featurize, read_reference
    from difftrain.finetune.controlnet import control_space, to_control
    from difftrain.sampling import generate, grid, sample_shape, save_png

    out = d / "controlnet_eval.json"
    g = load_run(run_dir, torch.device("cpu"))  # the run's served model (base + branch), its EMA weights
    if out.is_file() and json.loads(out.read_text()).get("fingerprint") == g.fingerprint:
        return json.loads(out.read_text())
    t0 = time.time()
    shape = sample_shape(g.acfg)
    side = shape[-1] * g.vae.downsample_factor
    ref = read_reference(data["plain"]["val"], data["plain"]["num_val"], side, g.cfg.data.channels)
    labels = ref["labels"]
    if (labels < 0).any():
        sys.exit(f"{data['plain']['val']}: held-out images without a label; the class match needs them")
    # each held-out image's control image as the loader makes it for training (the run's data.control transform on
    # the decoded uint8 [C, H, W] image), then as the trainer feeds it (PretrainStage.frozen): to [-1, 1], then into
    # the model's control space (the DiT's: encoded by the run's VAE, as its images are)
    fn = check_control(g.cfg.data.control)
    ctrl = torch.stack([apply_control(fn, g.cfg.data.control, im.permute(2, 0, 1), g.cfg.data.channels)
                        for im in ref["images"]])  # uint8 [N, C, H, W]
    with torch.no_grad():
        control = to_control(to_unit(ctrl.to(g.device)), control_space(g.cfg), g.vae)
    how, n = g.sampling, len(labels)
    samples = {}
    for name, c in (("on", control), ("off", None)):
        samples[name] = generate(g.model, g.diffusion, g.conditioner, g.vae, n=n, shape=shape, steps=how.steps,
                                 sampler=how.sampler, guidance=how.guidance, seed=0, device=g.device,
                                 captions=[""] * n, control=c, control_scale=1.0)  # uint8 [N, H, W, C]
    classifier = build_extractor("digits")

    def classify(images) -> torch.Tensor:
        return featurize(classifier, torch.as_tensor(images))["logits"].argmax(1)

    pred = {k: classify(v) for k, v in samples.items()}
    res = {"fingerprint": g.fingerprint, "step": g.step, "sampler": how.sampler, "steps": how.steps,
           "guidance": how.guidance, "n": n, "match": float((pred["on"] == labels).float().mean()),
           "match_off": float((pred["off"] == labels).float().mean()),
           "real_acc": float((classify(ref["images"]) == labels).float().mean()),  # the classifier on the images
           "labels": labels.tolist(), "pred_on": pred["on"].tolist(), "pred_off": pred["off"].tolist(),
           "eval_s": time.time() - t0}
    rows = [int((labels == k).nonzero()[0]) for k in range(grid_n) if (labels == k).any()]
    pics = np.concatenate([ctrl[rows].permute(0, 2, 3, 1).numpy(), samples["on"][rows], samples["off"][rows]])
    big = grid(pics, nrow=len(rows)).repeat(4, 0).repeat(4, 1)  # rows: control, with it, without; 4x, nearest
    save_png(big, d / "controlnet_samples.png")
    out.write_text(json.dumps(res))
    return res


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
    """The probe's figures, kept in DIR/probe.json (delete it to measure again; measured again when it lacks a
    method asked for)."""
    out = d / "probe.json"
    if not out.is_file() or set(methods) - set(json.loads(out.read_text())):
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


def binomial_ci(k: int, n: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval of a proportion k / n (Clopper & Pearson 1934: exact, from beta quantiles)."""
    from scipy.stats import beta

    return (float(beta.ppf(0.025, k, n - k + 1)) if k > 0 else 0.0,
            float(beta.ppf(0.975, k + 1, n - k)) if k < n else 1.0)


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
    ap.add_argument("--methods", default=",".join([*(m for m in METHODS if m not in RATE_SWEEP), "controlnet"]),
                    help=f"a comma-separated subset of {', '.join(METHODS)}, controlnet (full is in with any of the "
                    "others: the ratios are to it; controlnet alone: the base and the ControlNet only)")
    ap.add_argument("--ft-steps", type=int, default=0, help="fine-tuning steps (default 100, --quick 4)")
    ap.add_argument("--base-steps", type=int, default=0, help="the base's pre-training steps (default 400, --quick 20)")
    ap.add_argument("--controlnet-steps", type=int, default=0, help="the ControlNet's steps (default 600, --quick 4)")
    ap.add_argument("--base", default="", help="a trained base run to fine-tune (default: DIR/campaign/base, "
                    "trained here on the plain digits)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # the torchrun worker of the memory/time probe
    a = ap.parse_args()
    if a.probe:
        return probe(Path(a.probe))
    SEEDS[:] = list(range(a.seeds))
    n = {**(QUICK if a.quick else FULL), **({"ft": a.ft_steps} if a.ft_steps else {}),
         **({"base": a.base_steps} if a.base_steps else {}),
         **({"controlnet": a.controlnet_steps} if a.controlnet_steps else {})}
    asked = a.methods.split(",")
    if any(m not in METHODS and m != "controlnet" for m in asked):
        sys.exit(f"--methods {a.methods}: each must be one of {', '.join(METHODS)}, controlnet")
    with_controlnet = "controlnet" in asked
    asked = [m for m in asked if m != "controlnet"]
    wanted = ["full", *(m for m in asked if m != "full")] if asked else []
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
    (d / "campaign.yaml").write_text(campaign_yaml(d, data, n, methods, a.base and base_run, with_controlnet))
    print(f"campaign {d / 'campaign.yaml'} (log {log})", flush=True)
    torchrun(2, ["campaign", str(d / "campaign.yaml"), "--skip-eval"], log)
    tail = {"controlnet_class_match": float("nan"), "controlnet_class_match_off": float("nan")}
    if with_controlnet:
        cn = controlnet_match(d, data, d / "campaign" / "controlnet")
        hits = sum(p == y for p, y in zip(cn["pred_on"], cn["labels"]))
        lo, hi = binomial_ci(hits, cn["n"])
        cn_wall = json.loads((d / "campaign" / "controlnet" / "campaign.json").read_text()).get("wall_s")
        print(f"controlnet ({n['controlnet']} steps, train wall {cn_wall} s): class match with the control image "
              f"{cn['match']:.3f} ({hits}/{cn['n']}; 95% CI [{lo:.3f}, {hi:.3f}]), without {cn['match_off']:.3f} "
              f"({cn['n']} plain held-out images, empty prompt, {cn['sampler']} {cn['steps']} steps, CFG "
              f"{cn['guidance']}; the classifier on the images themselves {cn['real_acc']:.3f}; grid "
              f"{d / 'controlnet_samples.png'}; sampling + scoring {cn['eval_s']:.0f} s)", flush=True)
        tail = {"controlnet_class_match": cn["match"], "controlnet_class_match_lo": lo,
                "controlnet_class_match_hi": hi, "controlnet_class_match_off": cn["match_off"]}
    if not methods:  # --methods controlnet: the base and the ControlNet only
        figures = {**tail, "controlnet_steps": n["controlnet"], "base_steps": n["base"], "quick": int(a.quick),
                   "load_avg_start": load, "wall_s": time.time() - t0}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
        return
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
    h = next((m for m in (HEADLINE, "lora4", *methods) if m in methods and m.startswith("lora")), None)
    if h is None:
        sys.exit("no LoRA method in --methods: nothing to compare")
    figures = {"lora_vs_full_fid": figures[f"{h}_vs_full_fid"], "lora_vs_full_fid_lo": figures[f"{h}_vs_full_fid_lo"],
               "lora_vs_full_fid_hi": figures[f"{h}_vs_full_fid_hi"], "lora_rank": int(re.match(r"lora(\d+)", h)[1]),
               "lora_param_pct": pct[h], "lora_vs_full_optim_mem": mem[h] / mem["full"],
               **tail, "base_fid": base["fid"], **figures,
               "seeds": len(SEEDS), "ft_steps": n["ft"],
               **({"controlnet_steps": n["controlnet"]} if with_controlnet else {}), "base_steps": n["base"],
               "quick": int(a.quick), "load_avg_start": load, "wall_s": time.time() - t0}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
