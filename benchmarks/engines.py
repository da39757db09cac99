"""Engines side by side on this machine: DDP vs FSDP2 vs DeepSpeed ZeRO-1/2/3 (and ZeRO-Offload, tensor parallelism)
on 2 gloo ranks: step time and per-rank memory, next to the planner's prediction of the same bytes.

    python benchmarks/engines.py            # ~8 min on 2 shared cores (wall_s=464, load average 9-19)
    python benchmarks/engines.py --quick    # a smoke run, 2 rounds of 1 step (~2 min)

One ``torchrun`` launch of 2 processes (one thread each) holds every engine at once, each a real ``Trainer`` built from
``configs/demo.yaml`` with only ``parallel.*`` changed: the same text-conditional DiT (``MODEL`` at 16 px, 1 channel,
the packaged MiniLM captions, cross-attention in every block), the same global batch, the same seed, fp32, on the
scikit-learn digits. The step is the trainer's ``train_step`` (frozen text encoder, keyed noise, forward, loss,
backward, the engine's step: clip, AdamW, LR, EMA), fed 4 batches read once through the run's loader.

* **Memory**, per rank, counted from the tensors the rank holds, each storage once (views of a flat buffer count as
  the buffer): parameters (``DTensor.to_local`` under FSDP2; DeepSpeed's flat buffer under ZeRO-1/2, the partitions
  ``ds_tensor`` and the whole persistent parameters under ZeRO-3), gradients at the end of the backward, before the
  step (``p.grad``; DeepSpeed's reduced partitions), optimizer state (AdamW's moments and step counts; DeepSpeed's
  fp32 master partitions, a copy of the parameters even in fp32), the EMA. Next to each, the planner's prediction
  (``difftrain/parallelism/memory.py``) and its error. Not counted: communication buffers (DDP's gradient buckets,
  another copy of the gradients; DeepSpeed's reduce buckets), activations. "peak": the growth of the process's
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the engine is built) while the engine is
  built and runs its warm-up steps, with glibc's mmap threshold fixed at 64 KiB so that freed tensors go back to the
  OS; a CPU has no allocator peak, so this is the nearest stand-in, and it includes activations and buffers.
* **Step time**: after warm-up, ``rounds`` rounds; in each, every engine runs ``k`` steps, in an order rotated
  from round to round (the machine's speed drifts); ratios are medians over rounds of the paired ratios.
* Cases the config refuses (``ConfigError``: ZeRO-Offload's ``parallel.zero_offload_*`` keys and
  ``parallel.tp=2`` before they are built) are printed as "n/a (not built)"; a rerun fills them in.

Then the planner's table for 64 H100s (``difftrain plan PRESET --engines``): DiT-XL/2 and the 30B DiT, each engine.
Progress goes to stderr; stdout gets the tables and, last, one line of ``key=value`` figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo.yaml"
MODEL, BATCH = "DiT-S/4", 32  # 16 tokens of width 384, 12 blocks: 33M trained parameters; global batch
PLANS = {"full": dict(warmup=3, rounds=7, k=2), "quick": dict(warmup=2, rounds=2, k=1)}
KINDS = ("params", "grads", "optimizer", "ema")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ worker
class Probe:
    """Wraps an engine's ``step``: when armed, counts what the rank holds at the end of the backward, before it."""

    def __init__(self, engine):
        from difftrain.parallelism.memory import held_bytes

        self.engine, self.step, self.count, self.armed, self.counts = engine, engine.step, held_bytes, False, None
        engine.step = self

    def __call__(self, *args, **kwargs):
        if self.armed:
            self.counts, self.armed = self.count(self.engine), False
        return self.step(*args, **kwargs)


def worker(out: Path, data: str, cases: list[str], plan: dict) -> None:
    import torch
    import torch.distributed as dist

    from difftrain.config import ConfigError
    from difftrain.config_checks import load_config
    from difftrain.launch.env import shutdown
    from difftrain.parallelism.memory import CASES, shapes_of
    from difftrain.train.metrics import Metrics
    from difftrain.train.trainer import Trainer

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    say = log if os.environ.get("RANK", "0") == "0" else (lambda msg: None)
    by_name = {c.name: c for c in CASES}
    live, res = {}, {}
    resettable = reset_peak()
    for name in cases:
        case = by_name[name]
        over = [f"data.train={data}", f"run.dir={out / name}", f"run.steps={10 ** 6}", "run.log_every=1000000",
                "run.ckpt_every=0", "run.sample_every=0", "run.progress=false", "run.device=cpu", "eval.every=0",
                f"data.batch_size={BATCH}", "data.num_workers=0", f"model.name={MODEL}", *case.overrides()]
        rss0 = _status_kb("VmRSS")
        reset_peak()
        try:
            trainer = Trainer(load_config(DEMO_YAML, over))
        except ConfigError as e:
            res[name] = {"refused": str(e)}
            say(f"[{name}] n/a: {e}")
            continue
        trainer.metrics = Metrics(trainer.run_dir, trainer.rank, trainer.meshes.dp, trainer.device, trainer.cfg.run, 0)
        it = iter(trainer.loader)
        batches = [next(it) for _ in range(4)]
        probe = Probe(trainer.engine)
        t0 = time.perf_counter()
        for i in range(plan["warmup"]):
            probe.armed = i == plan["warmup"] - 1
            trainer.train_step(batches[i % 4])
            trainer.step += 1
        peak_kb = (_status_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - rss0
        res[name] = {"counted": probe.counts, "peak_rss": peak_kb * 1024, "warmup_s": time.perf_counter() - t0,
                     "times": []}
        if "_shapes" not in res and case.engine != "deepspeed":  # ZeRO-3's parameters have no shape of their own
            res["_shapes"] = shapes_of(trainer.engine.module)
        live[name] = (trainer, batches)
        say(f"[{name}] built; counted {probe.counts}, peak RSS growth {peak_kb / 1024:.0f} MiB")
    names = list(live)
    for r in range(plan["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            trainer, batches = live[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(plan["k"]):
                trainer.train_step(batches[trainer.step % 4])
                trainer.step += 1
            res[name]["times"].append((time.perf_counter() - t0) / plan["k"])
        say(f"round {r + 1}/{plan['rounds']}: " + ", ".join(f"{n} {res[n]['times'][-1] * 1e3:.0f} ms" for n in names))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, res)
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"ranks": everyone, "maxrss": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss * 1024, "resettable": resettable}))
    for trainer, _ in live.values():
        trainer.metrics.close()
    shutdown()


# ------------------------------------------------------------------------------------------------ report
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mb(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


def report(result: dict, cases: list[str], plan: dict, quick: bool) -> dict:
    from difftrain.parallelism.memory import CASES, predict

    by_name = {c.name: c for c in CASES}
    ranks = result["ranks"]
    shapes = {k: tuple(v) for k, v in ranks[0]["_shapes"].items()}
    psi = sum(math.prod(s) for s in shapes.values())
    built = [n for n in cases if "refused" not in ranks[0][n]]
    ms = {n: statistics.median(ranks[0][n]["times"]) * 1e3 for n in built}
    print(f"\n{MODEL} at 16 px, text-conditional: {psi / 1e6:.2f}M trained parameters; global batch {BATCH}, "
          f"2 gloo ranks x 1 thread, fp32; {plan['rounds']} rounds x {plan['k']} steps per engine after "
          f"{plan['warmup']} warm-up steps{' (quick run)' if quick else ''}\n")
    print("| engine | ms/step (median) | vs ddp (min..max over rounds) | params MiB | grads MiB | optimizer MiB "
          "| EMA MiB | state MiB | peak RSS growth MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    figures, worst = {}, 0.0
    ratios = {}
    for n in cases:
        if n not in built:
            print(f"| {n} | n/a (not built) | | | | | | | |")
            continue
        c0 = ranks[0][n]["counted"]
        if "ddp" in built and n != "ddp":
            rr = [a / b for a, b in zip(ranks[0][n]["times"], ranks[0]["ddp"]["times"])]
            ratios[n] = (statistics.median(rr), min(rr), max(rr))
            vs = f"{ratios[n][0]:.2f} ({ratios[n][1]:.2f}..{ratios[n][2]:.2f})"
        else:
            vs = "1" if n == "ddp" else "-"
        peak = max(r[n]["peak_rss"] for r in ranks)
        cells = " | ".join("/".join(mb(r[n]["counted"][k]) for r in ranks) if len({r[n]["counted"][k] for r in ranks})
                           > 1 else mb(c0[k]) for k in KINDS)
        print(f"| {n} | {ms[n]:.0f} | {vs} | {cells} | {mb(sum(c0.values()))} | {mb(peak)} |")
    print("\n(cells with a / differ between rank 0 and rank 1; peak RSS growth: the larger rank's)\n")
    print("Planner's prediction (difftrain/parallelism/memory.py) vs counted, rank 0, MiB (error %)\n")
    print("| engine | params | grads | optimizer | EMA | state |")
    print("|---|---|---|---|---|---|")
    for n in built:
        pred = predict(shapes, by_name[n], 2).with_host()
        pred["state"] = sum(pred.values())
        cells = []
        for k in (*KINDS, "state"):
            got = [r[n]["counted"][k] if k != "state" else sum(r[n]["counted"].values()) for r in ranks]
            err = max(abs(pred[k] - g) / g * 100 if g else (0.0 if pred[k] == 0 else float("inf")) for g in got)
            worst = max(worst, err)
            cells.append(f"{mb(pred[k])} vs {mb(got[0])} ({err:.1f})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for n in built:
        figures[f"{n}_ms"] = f"{ms[n]:.0f}"
    if "zero3" in built and "ddp" in built:
        figures["zero3_vs_ddp_step"] = f"{ratios['zero3'][0]:.3f}"
        state = {n: sum(ranks[0][n]["counted"].values()) for n in ("zero3", "ddp")}
        figures["zero3_vs_ddp_mem"] = f"{state['zero3'] / state['ddp']:.3f}"
    for n in ("fsdp2", "zero1", "zero2"):
        if n in ratios:
            figures[f"{n}_vs_ddp_step"] = f"{ratios[n][0]:.3f}"
    figures["mem_pred_err_pct"] = f"{worst:.1f}"
    figures["not_built"] = ",".join(n for n in cases if n not in built) or "none"
    return figures


def planner_tables() -> None:
    from difftrain.parallelism.pipeline.costs import HARDWARE
    from difftrain.parallelism.pipeline.plan import PRESETS, engines_table, preset_profile

    hw = HARDWARE["h100"]
    for name in PRESETS:
        log(f"planner: {name}")
        profile, batch, about, model = preset_profile(name, hw)
        print(f"\n{about}: `difftrain plan {name} --gpus 64 --engines`\n")
        print("\n".join(engines_table(profile, model, 64, batch, hw)))


def main() -> None:
    from difftrain.parallelism.memory import CASES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 1 step")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated engine cases")
    ap.add_argument("--worker", nargs=2, metavar=("OUT", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = PLANS["quick" if args.quick else "full"]
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; valid: {', '.join(c.name for c in CASES)}")
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], cases, plan)
        return
    from difftrain.data.demo import write_digits

    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="difftrain_engines_") as tmp:
        tmp = Path(tmp)
        data = write_digits(tmp / "digits", image_size=16, progress=False)["train"]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", __file__, "--worker", str(tmp / "out"), data,
               "--cases", ",".join(cases), *(["--quick"] if args.quick else [])]
        log("launch: " + " ".join(cmd))
        subprocess.run(cmd, env=env, check=True)
        result = json.loads((tmp / "out" / "result.json").read_text())
    print(f"load average at start {load:.2f}, {os.cpu_count()} CPUs")
    figures = report(result, cases, plan, args.quick)
    planner_tables()
    figures["load_avg_start"] = f"{load:.2f}"
    figures["wall_s"] = f"{time.perf_counter() - t_start:.0f}"
    print()
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
