"""Runs inside torchrun (gloo): one DiT (text-conditional, adaLN-single) or UNet trained one step by every
pipeline schedule on this world's ranks. Usage: pipeline_job.py OUT. Writes OUT/rank{r}.pt: per case, this rank's
stage gradients and micro-batch losses, and the single-process reference gradients of the same step (each rank
computes it on the full batch: same seed, same weights), all in float64."""
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

from difftrain.config import ModelConfig
from difftrain.models import registry
from difftrain.parallelism.pipeline.runtime import build_pipeline
from difftrain.parallelism.pipeline.stages import cond_keys

B, M, TEXT_DIM, LEN = 8, 4, 16, 5


def model_for(name: str):
    if name == "dit":
        mcfg = ModelConfig(name="DiT-T/2", image_size=8, in_channels=4, cond="text", args={"depth": 8})
    else:
        mcfg = ModelConfig(name="UNet-T", image_size=8, in_channels=4, cond="text")
    arch, acfg = registry.arch_config(mcfg, text_dim=TEXT_DIM)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    with torch.no_grad():  # non-zero gates and output layer: gradients reach every block
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.double()  # float64: the comparison sees the schedule, not fp32 summation order


def batch():
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g)
    mask = torch.ones(B, LEN, dtype=torch.bool)
    mask[::3, 2:] = False
    cond = {"text_states": torch.randn(B, LEN, TEXT_DIM, generator=g), "text_mask": mask}
    target = torch.randn(B, 4, 8, 8, generator=g)
    cond["text_states"] = cond["text_states"].double()
    return x.double(), t.double(), cond, target.double()


def loss_fn(pred, target):
    return (pred - target).square().mean()


CASES = {  # name: (model, schedule, stages per rank)
    "dit_gpipe": ("dit", "gpipe", 1),
    "dit_1f1b": ("dit", "1f1b", 1),
    "dit_interleaved_1f1b": ("dit", "interleaved_1f1b", 2),
    "dit_zero_bubble": ("dit", "zero_bubble", 2),
    "unet_1f1b": ("unet", "1f1b", 1),
    "unet_zero_bubble": ("unet", "zero_bubble", 2),
}


def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    x, t, cond, target = batch()
    results = {}
    for case, (name, schedule, per_rank) in CASES.items():
        if world > 2 and case != "dit_1f1b":
            continue
        model = model_for(name)
        ref = copy.deepcopy(model)
        loss_fn(ref(x, t, cond), target).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        n_blocks, n_stages = len(model.blocks), world * per_rank
        bounds = [(n_blocks * s // n_stages, n_blocks * (s + 1) // n_stages) for s in range(n_stages)]
        pipe = build_pipeline(model, bounds, schedule, M, loss_fn, dist.group.WORLD, torch.device("cpu"))
        chunks = lambda v: list(v.chunk(M))  # noqa: E731
        inputs = list(zip(chunks(x), chunks(t), *(chunks(cond[k]) for k in cond_keys(model))))
        losses = pipe.step(inputs, chunks(target))
        results[case] = {"ids": pipe.ids, "losses": [float(v) for v in losses],
                         "grads": {n: p.grad.clone() for n, p in pipe.named_parameters()},
                         "ref": {n: ref_grads[n] for n, _ in pipe.named_parameters()},
                         "ref_mb_losses": [float(loss_fn(ref(*a[:2], dict(zip(cond_keys(model), a[2:]))), tg))
                                           for a, tg in zip(inputs, chunks(target))]}
        dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
