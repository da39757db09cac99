"""Cost of immiscible noise assignment against a training step, on this machine's CPU.

    python benchmarks/assign_cost.py            # ~2 min on 2 idle cores
    python benchmarks/assign_cost.py --quick    # batch 64 and 256 only

For per-rank batches B = 64, 256, 1024 and two sample sizes, pixel (1 x 16 x 16: the demo's images) and latent
(4 x 32 x 32: an SD-VAE latent of a 256 px image), times in the same process (``torch.set_num_threads(2)``):

* ``linear``: ``diffusion.assign.linear_assign`` on the rank's batch: the L2 cost matrix (``torch.cdist``, float32
  on the CPU) and scipy's Hungarian solve (O(B^3), single-threaded), plus the gather of the permuted noise;
* ``knn`` (k = 4): ``knn_candidates`` (k - 1 extra keyed normal draws per sample: a CPU generator per sample,
  as every keyed draw in difftrain) and ``knn_select``;
* the reference: one bare training step of the demo model at the same batch (DiT-T/2, 16 px, 1 channel,
  text-conditional with 12 x 384 text states, fp32: forward, MSE, backward, AdamW), the denominator of
  ``% of step``.

Median of repeats, assignment and steps interleaved. Then the cross-rank (``global``) variant on 2 gloo processes
(one thread each, spawned here): ``linear_assign(..., group=WORLD)`` at the same per-rank batches, i.e. the
all-gathers of sizes, samples and noise, rank 0's solve at the gathered batch 2B and the broadcast of the
permutation; as % of the demo step at the per-rank batch measured above. Not measured here: GPU timings.
Ends with one line of ``key=value`` figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SIZES = {"pixel": (1, 16, 16), "latent": (4, 32, 32)}


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def demo_step(batch: int):
    from difftrain.config_checks import load_config
    from difftrain.models import registry

    cfg = load_config(None, ["model.name=DiT-T/2", "model.image_size=16", "model.in_channels=1", "model.cond=text",
                             "encoders.text=minilm"])
    arch, acfg = registry.arch_config(cfg.model, text_dim=384)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 1, 16, 16, generator=g), torch.rand(batch, generator=g)
    cond = {"text_states": torch.randn(batch, 12, 384, generator=g), "text_mask": torch.ones(batch, 12, dtype=torch.bool)}

    def step():
        loss = (model(x, t, cond) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _global_worker(rank: int, world: int, port: int, batches: list[int], queue) -> None:
    import os

    import torch.distributed as dist

    from difftrain.diffusion.assign import linear_assign

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for b in batches:
        for name, shape in SIZES.items():
            g = torch.Generator().manual_seed(1000 * rank + b)
            x0, eps = torch.rand(b, *shape, generator=g) * 2 - 1, torch.randn(b, *shape, generator=g)
            linear_assign(x0, eps, group=dist.group.WORLD)  # warm-up
            dist.barrier()
            ms = timed(lambda: linear_assign(x0, eps, group=dist.group.WORLD), 5)
            if rank == 0:
                queue.put((b, name, ms))
    dist.destroy_process_group()


def global_scope(batches: list[int], step_ms: dict, figures: dict) -> None:
    import torch.multiprocessing as mp

    from difftrain.launch.env import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_global_worker, args=(2, _free_port(), batches, queue), nprocs=2, start_method="spawn")
    print("\n2 ranks, `assign_scope=global` (gather 2B, solve on rank 0, broadcast):\n")
    print("| per-rank batch | size | global linear ms | demo step ms (per-rank batch) | % of step |")
    print("|---|---|---|---|---|")
    while not queue.empty():
        b, name, ms = queue.get()
        print(f"| {b} | {name} {'x'.join(map(str, SIZES[name]))} | {ms:.1f} | {step_ms[b]:.0f} | "
              f"{100 * ms / step_ms[b]:.2f} |", flush=True)
        figures[f"global_ms_{name}_{b}"] = ms
        figures[f"global_pct_{name}_{b}"] = 100 * ms / step_ms[b]


def main() -> None:
    from difftrain.diffusion.assign import knn_candidates, knn_select, linear_assign

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    batches = [64, 256] if args.quick else [64, 256, 1024]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'quick' if args.quick else 'full'} run\n")
    print("| batch | size | linear ms | knn (k=4) ms | demo step ms | linear % of step | knn % of step |")
    print("|---|---|---|---|---|---|---|")
    figures, t0 = {}, time.perf_counter()
    for b in batches:
        step = demo_step(b)
        step()  # warm-up
        step_ms = timed(step, 3)
        for name, shape in SIZES.items():
            g = torch.Generator().manual_seed(b)
            x0, eps = torch.rand(b, *shape, generator=g) * 2 - 1, torch.randn(b, *shape, generator=g)
            idx = torch.arange(b)
            la = timed(lambda: linear_assign(x0, eps), 5)
            knn = timed(lambda: knn_select(x0, knn_candidates(eps, 0, 1, idx, 4)), 5)
            step_ms = 0.5 * (step_ms + timed(step, 2))  # interleaved: the step again after the assignments
            print(f"| {b} | {name} {'x'.join(map(str, shape))} | {la:.1f} | {knn:.1f} | {step_ms:.0f} | "
                  f"{100 * la / step_ms:.2f} | {100 * knn / step_ms:.2f} |", flush=True)
            figures.update({f"la_ms_{name}_{b}": la, f"knn_ms_{name}_{b}": knn, f"step_ms_{b}": step_ms,
                            f"la_pct_{name}_{b}": 100 * la / step_ms, f"knn_pct_{name}_{b}": 100 * knn / step_ms})
    global_scope(batches, {b: figures[f"step_ms_{b}"] for b in batches}, figures)
    figures["wall_s"] = time.perf_counter() - t0
    print("\n" + " ".join(f"{k}={v:.3g}" for k, v in figures.items()), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
