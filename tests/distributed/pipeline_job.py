"""Runs inside torchrun (gloo): one DiT (text-conditional, adaLN-single) or UNet trained one step by every
pipeline schedule on this world's ranks; then the frozen-work cases (FILL_CASES): bubble filling for GPipe/1F1B
and the balanced fallback for the others, with a frozen "VAE" and "text encoder" over two iterations. Usage: pipeline_job.py OUT. Writes OUT/rank{r}.pt: per case, this rank's
segment gradients and micro-batch losses, and the single-process reference gradients of the same step (each rank
computes it on the full batch: same seed, same weights), all in float64."""
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

from difftrain.config import ModelConfig
from difftrain.models import registry
from difftrain.parallelism.pipeline.costs import BlockCost, FrozenCost, Profile
from difftrain.parallelism.pipeline.fill import CurrentFill, FrozenFill, FrozenModule
from difftrain.parallelism.pipeline.partition import uniform_bounds
from difftrain.parallelism.pipeline.runtime import build_pipeline
from difftrain.parallelism.pipeline.simulate import current_plan, simulate
from difftrain.parallelism.pipeline.segments import cond_keys, num_blocks

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


CASES = {  # name: (model, schedule, segments per rank)
    "dit_gpipe": ("dit", "gpipe", 1),
    "dit_1f1b": ("dit", "1f1b", 1),
    "dit_interleaved_1f1b": ("dit", "interleaved_1f1b", 2),
    "dit_zero_bubble": ("dit", "zero_bubble", 2),
    "unet_1f1b": ("unet", "1f1b", 1),
    "unet_zero_bubble": ("unet", "zero_bubble", 2),
}


FILL_CASES = {  # name: (model, schedule, segments per rank, frozen-work mode[, owners: module -> rank on 2 ranks])
    "dit_1f1b_fill": ("dit", "1f1b", 1, "fill"),
    "dit_1f1b_fill_owned": ("dit", "1f1b", 1, "fill", {"text": 1, "vae": 0}),
    "dit_zero_bubble_balanced_owned": ("dit", "zero_bubble", 2, "balanced", {"text": 1, "vae": 0}),
    "dit_gpipe_fill": ("dit", "gpipe", 1, "fill"),
    "unet_1f1b_fill": ("unet", "1f1b", 1, "fill"),
    "dit_interleaved_1f1b_balanced": ("dit", "interleaved_1f1b", 2, "balanced"),
    "dit_zero_bubble_balanced": ("dit", "zero_bubble", 2, "balanced"),
}


def frozen_modules(held: set[str] | None = None) -> list[FrozenModule]:
    """A frozen "VAE" (stride-2 conv, 4x16x16 pixels -> 4x8x8 latents) and "text encoder" (token ids -> states and
    mask), float64, the same on every rank; ``held``: only these are callable here (partitioned frozen modules)."""
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1).double()
    emb = torch.nn.Embedding(50, TEXT_DIM).double()
    with torch.no_grad():
        for p in [*conv.parameters(), *emb.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    mods = [FrozenModule("vae", lambda mb: (conv(mb["pixels"]),)),
            FrozenModule("text", lambda mb: (torch.tanh(emb(mb["ids"])), mb["ids"] > 0))]
    return [m if held is None or m.name in held else FrozenModule(m.name, None) for m in mods]


def raw_mbs(it: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + it)
    pixels = torch.randn(B, 4, 16, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 50, (B, LEN), generator=g)
    ids[::3, 2:] = 0
    return [{"pixels": p, "ids": i} for p, i in zip(pixels.chunk(M), ids.chunk(M))]


def mb_inputs(o: dict, it: int, i: int):
    """x_t on the rectified-flow path and the velocity target: the last segment needs the latents too."""
    x0 = o["vae"][0]
    g = torch.Generator().manual_seed(1000 * it + i)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    t = torch.rand(x0.shape[0], generator=g, dtype=x0.dtype)
    tt = t.view(-1, 1, 1, 1)
    return ((1 - tt) * x0 + tt * eps, t, *o["text"]), eps - x0


def inputs_from(outs: list[dict], it: int):
    pairs = [mb_inputs(o, it, i) for i, o in enumerate(outs)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _profile(n_blocks: int) -> Profile:
    """Made-up costs that force a module's micro-batch to be split over two slots."""
    return Profile([BlockCost(1.0, 2.0, 8, 8, 1) for _ in range(n_blocks)],
                   [FrozenCost("text", 1.5, 8, 1), FrozenCost("vae", 1.0, 8, 1)], mb_size=B // M)


def fill_placement(n_blocks: int, world: int, schedule: str, owners=None) -> list[dict]:
    """Per rank ``{slot: [Chunk]}``: where the simulator puts the next iteration's frozen work."""
    r = simulate(_profile(n_blocks), uniform_bounds(n_blocks, world), M, schedule, "fill", owners=owners)
    return [{slot: cs for (rr, slot), cs in r.placement.items() if rr == q} for q in range(world)]


def merge(*slot_dicts: dict) -> dict:
    out: dict = {}
    for d in slot_dicts:
        for k, v in d.items():
            out.setdefault(k, []).extend(v)
    return out


def fill_case(name, schedule, per_rank, mode, owned=None, *, world, rank):
    model = model_for(name)
    ref = copy.deepcopy(model)
    n_blocks, n_segments = num_blocks(model), world * per_rank
    bounds = [(n_blocks * s // n_segments, n_blocks * (s + 1) // n_segments) for s in range(n_segments)]
    owners = {k: {r} for k, r in owned.items()} if owned else None
    placement = fill_placement(n_blocks, world, schedule, owners)[rank] if mode == "fill" else {}
    held = {k for k, rs in owners.items() if rank in rs} if owners else None
    frozen = FrozenFill(frozen_modules(held), placement, dist.group.WORLD)
    pipe = build_pipeline(model, bounds, schedule, M, loss_fn, dist.group.WORLD, torch.device("cpu"),
                          fill=mode == "fill")
    p2p = dist.new_group(backend="gloo")  # the mid-step deliveries' own group
    res = {"ids": pipe.ids, "trace": [],
           "placement": {k: [(c.name, c.mb, c.lo, c.hi) for c in cs] for k, cs in placement.items()}}
    outs = None  # iteration 0: nothing was prefetched
    for it in range(2):
        for p in pipe.modules:
            p.zero_grad(set_to_none=True)
        if mode == "fill":
            t0 = time.perf_counter()
            nxt_slots = frozen.slots(raw_mbs(it + 1), tag=f"it{it + 1}:")
            if outs is None:  # this iteration's frozen work in its own bubbles, delivered mid-step
                pieces = current_plan(_profile(n_blocks), bounds, M, schedule, owners)
                cur = CurrentFill(frozen, pieces, raw_mbs(0), dist.group.WORLD, p2p,
                                  lambda i, o: mb_inputs(o, it, i)[0], lambda i, o: mb_inputs(o, it, i)[1])
                losses = pipe.step(None, None, slots=merge(cur.slots(tag=f"it{it}:"), nxt_slots),
                                   input_fn=cur.input_fn if pipe.has_first else None,
                                   target_fn=cur.target_fn if pipe.has_last else None)
                cur.finish()
                res["current"] = {"pieces": [(k, c.name, c.mb, c.lo, c.hi, inl) for k, c, inl in pieces[rank]],
                                  "outputs": cur.results}
                res["losses0"] = [float(v) for v in losses]
            else:
                losses = pipe.step(*inputs_from(outs, it), slots=nxt_slots)
            res["trace"].append({"window": (t0, time.perf_counter()), "events": list(pipe.schedule.trace)})
            nxt = frozen.deliver(M)
        else:
            if outs is None:
                outs = frozen.balanced(raw_mbs(0), rank, world, owners)
            losses = pipe.step(*inputs_from(outs, it))
            nxt = frozen.balanced(raw_mbs(it + 1), rank, world, owners)
        inline = FrozenFill(frozen_modules(), {}).run_all(raw_mbs(it + 1))
        res[f"frozen_diff{it}"] = max(float((a.double() - b.double()).abs().max()) for o, q in zip(nxt, inline)
                                      for k in o for a, b in zip(o[k], q[k]))
        outs = nxt
    inputs, targets = inputs_from(FrozenFill(frozen_modules(), {}).run_all(raw_mbs(1)), 1)
    first = inputs_from(FrozenFill(frozen_modules(), {}).run_all(raw_mbs(0)), 0)
    res["ref_losses0"] = [float(loss_fn(ref(x_t, t, dict(zip(cond_keys(ref), c))), tg))
                          for (x_t, t, *c), tg in zip(*first)]
    res["inline0"] = FrozenFill(frozen_modules(), {}).run_all(raw_mbs(0))
    # gradients of the last step (its inputs came from delivered frozen work) against a single process
    ref_losses = [loss_fn(ref(x_t, t, dict(zip(cond_keys(ref), c))), tg) for (x_t, t, *c), tg in zip(inputs, targets)]
    (sum(ref_losses) / M).backward()
    ref_grads = dict(ref.named_parameters())
    res.update(losses=[float(v) for v in losses], ref_mb_losses=[float(v) for v in ref_losses],
               grads={n: p.grad.clone() for n, p in pipe.named_parameters()},
               ref={n: ref_grads[n].grad for n, _ in pipe.named_parameters()})
    return res


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
        n_blocks, n_segments = len(model.blocks), world * per_rank
        bounds = [(n_blocks * s // n_segments, n_blocks * (s + 1) // n_segments) for s in range(n_segments)]
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
    for case, spec in FILL_CASES.items():
        if world > 2 and case != "dit_1f1b_fill":
            continue
        results[case] = fill_case(*spec, world=world, rank=rank)
        dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
