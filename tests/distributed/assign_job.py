"""Runs inside torchrun (gloo): noise assignment on each rank's slice of one global batch.
Usage: assign_job.py OUT. Writes OUT/rank{r}.pt with the rank's inputs and the assigned noise of the
pretrain stage (linear, global and rank scope; knn) and of ``linear_assign`` on uneven per-rank batches."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from difftrain.config_checks import load_config
from difftrain.diffusion.assign import linear_assign
from difftrain.diffusion.diffusion import build_diffusion
from difftrain.diffusion.keyed import keyed_randn
from difftrain.train.build import Shared
from difftrain.train.stages.pretrain import PretrainStage

GLOBAL_BATCH, SHAPE, STEP = 12, (3, 4, 4), 5


def data(index):
    return keyed_randn(99, 0, index, SHAPE, "sample").tanh()  # x0 in [-1, 1], keyed by global index


def stage(assign, scope):
    cfg = load_config(None, [f"diffusion.assign={assign}", f"diffusion.assign_scope={scope}", "run.seed=3"])
    return PretrainStage(Shared.parts(cfg, torch.device("cpu"), diffusion=build_diffusion(cfg.diffusion)))


def main():
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // world
    idx = torch.arange(rank * n, (rank + 1) * n)
    batch = {"x0": data(idx), "index": idx, "cond": {}}
    res = {"index": idx, "x0": batch["x0"]}
    for name, (assign, scope) in {"global": ("linear", "global"), "rank": ("linear", "rank"),
                                  "knn": ("knn", "global"), "none": ("none", "rank")}.items():
        prep = stage(assign, scope).prepare(batch, STEP)
        res[name], res[f"{name}_t"] = prep["eps"], prep["t"]
    # uneven batches (5 + 7): padded gather, explicit group
    uidx = torch.arange(0, 5) if rank == 0 else torch.arange(5, 12)
    ueps = keyed_randn(3, STEP, uidx, SHAPE)
    res["uneven_index"], res["uneven"] = uidx, linear_assign(data(uidx), ueps, group=dist.group.WORLD)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
