"""``difftrain eval``: sample a model, featurise, and score against real images; NFE sweeps over samplers.

    difftrain eval runs/demo --ref "data/digits/val/{00000..00000}.tar" --extractor digits --samples 1000
    difftrain eval runs/teacher runs/student --ref ... --steps 1,2,4,8,16,32,64 --sampler euler,heun,dpmpp2m
    torchrun --nproc_per_node=2 -m difftrain eval runs/demo --ref ...      # ranks share the chunks

**Samples.** Sample ``i`` starts from noise keyed by (``--seed``, ``i``) and is conditioned on reference
sample ``i mod m``'s caption (text models) or label (class models), so the generated set follows the
reference set's conditions and class accuracy compares each sample with the class it was asked for.
Samples are made in chunks of ``CHUNK``; chunk ``j`` is made by rank ``j mod W`` and stored as
``OUT/<run>/<setting>/chunk_j_<count>.safetensors`` (features, logits): a killed job resumes where it
stopped, a larger ``--samples`` reuses the chunks it has, and the chunks (so the metrics) do not depend on ``W``.

**Metrics** (``metrics.py``): FID, KID (mean and std over subsets), precision and recall (k = 3), and
``class_acc`` when the extractor is a classifier and the conditions carry labels. Each setting's row goes
to ``OUT/results.json``; a table and, for sweeps, ``OUT/fid_vs_nfe.png`` follow. The last line is
``fid=… kid=… kid_std=… precision=… recall=…`` (``class_acc=…``, ``clip_score=…``) of the last setting;
``clip_score`` (Hessel et al. 2021) when the extractor is CLIP and the samples have captions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from difftrain.config import ConfigError

CHUNK = 250  # default samples per resumable chunk: a chunk's bits never depend on the world size


def _split(text: str, cast) -> list:
    try:
        return [cast(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list, got '{text}'") from None


def output_size(g) -> tuple[int, int]:
    """(pixels, channels) of the images a generator decodes to."""
    if getattr(g.acfg, "frames", 0):
        raise ConfigError(f"'{g.name}' is a video model: eval scores image models (per-frame FVD is not built yet)")
    factor = g.vae.downsample_factor
    return g.acfg.image_size * factor, (g.acfg.in_channels if factor == 1 else 3)


def conditions(cond: str, num_classes: int, ref: dict, n: int, start: int = 0):
    """(captions, labels, wanted labels) for samples ``start .. start + n - 1``: reference sample ``i mod m``'s."""
    m = len(ref["captions"])
    idx = [(start + i) % m for i in range(n)]
    ref_labels = ref["labels"].long()
    wanted = ref_labels[idx]
    if cond == "text":
        return [ref["captions"][i] for i in idx], None, wanted
    if cond == "class":
        if (ref_labels < 0).any() or (ref_labels >= num_classes).any():
            labels = torch.arange(start, start + n) % num_classes  # no usable reference labels
            return None, labels, labels
        return None, wanted, wanted
    return None, None, None


def setting_dir(out: Path, g, extractor, sampler: str, steps: int, guidance: float, seed: int, chunk: int) -> Path:
    # the weights' fingerprint too: a run retrained to the same step does not reuse the old samples
    key = hashlib.sha256(f"{g.step}|{g.fingerprint}|{extractor.fingerprint}|{chunk}".encode()).hexdigest()[:8]
    return out / g.name / f"{sampler}_{steps}steps_g{guidance:g}_seed{seed}_{key}"


def sample_features(g, extractor, ref: dict, *, n: int, sampler: str, steps: int, guidance: float, seed: int,
                    folder: Path, rank: int = 0, world: int = 1, batch: int = 50, chunk: int = CHUNK,
                    progress: bool = False) -> dict:
    """This rank's chunks of ``n`` samples (skipping stored ones); then, after a barrier, everyone's, in order:
    ``{"features", "logits"?, "wanted"}``."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from difftrain.sampling import generate, grid, sample_shape, save_png

    folder.mkdir(parents=True, exist_ok=True)
    chunks = math.ceil(n / chunk)
    extent = lambda j: (j * chunk, min(n, (j + 1) * chunk))  # noqa: E731

    def stored(j: int) -> Path | None:  # a file of chunk j holding at least the samples needed
        have = sorted(folder.glob(f"chunk_{j:05d}_*.safetensors"), key=lambda f: -int(f.stem.split("_")[-1]))
        lo, hi = extent(j)
        return have[0] if have and int(have[0].stem.split("_")[-1]) >= hi - lo else None

    todo = [j for j in range(chunks) if j % world == rank and stored(j) is None]
    bar = tqdm(todo, desc=f"{g.name} {sampler} {steps} steps", unit="chunk", disable=not progress or not todo)
    for j in bar:
        lo, hi = extent(j)
        captions, labels, _ = conditions(g.cond, g.cfg.model.num_classes, ref, hi - lo, lo)
        images = generate(g.model, g.diffusion, g.conditioner, g.vae, n=hi - lo, shape=sample_shape(g.acfg),
                          steps=steps, sampler=sampler, guidance=guidance, seed=seed, device=g.device,
                          captions=captions, labels=labels, batch_size=batch, start=lo)
        feats = sample_features_of(extractor, images, captions)
        if j == 0:
            save_png(grid(images[:64]), folder / "samples.png")
        tmp = folder / f".chunk_{j:05d}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
        tmp.replace(folder / f"chunk_{j:05d}_{hi - lo}.safetensors")
    if world > 1:
        dist.barrier()
    parts = [load_file(str(stored(j))) for j in range(chunks)]
    out = {k: torch.cat([p[k][: extent(j)[1] - extent(j)[0]] for j, p in enumerate(parts)]) for k in parts[0]}
    out["wanted"] = conditions(g.cond, g.cfg.model.num_classes, ref, n)[2]
    return out


def sample_features_of(extractor, images: np.ndarray, captions: list[str] | None, batch: int = 100) -> dict:
    """Features (and logits) of uint8 samples [N, H, W, C]; with a CLIP extractor and captions also each
    sample's ``clip_score`` against the caption it was generated from."""
    from difftrain.eval.clip import ClipExtractor, clip_score
    from difftrain.eval.reference import featurize

    x = torch.from_numpy(images)
    out = featurize(extractor, x, batch)
    if isinstance(extractor, ClipExtractor) and captions is not None:
        with torch.no_grad():
            out["clip_score"] = torch.cat([clip_score(extractor, x[lo:lo + batch], captions[lo:lo + batch]).float().cpu()
                                           for lo in range(0, len(x), batch)])
    return out


def score(ref: dict, fake: dict, k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID, KID (mean, std), precision, recall and, when possible, class accuracy."""
    from difftrain.eval.metrics import fid_from_features, kid, precision_recall

    real, gen = ref["features"].double().numpy(), fake["features"].double().numpy()
    kid_mean, kid_std = kid(real, gen, subsets=kid_subsets, subset_size=kid_subset_size)
    precision, recall = precision_recall(real, gen, k=k)
    out = {"fid": fid_from_features(real, gen), "kid": kid_mean, "kid_std": kid_std,
           "precision": precision, "recall": recall}
    if "clip_score" in fake:
        out["clip_score"] = float(fake["clip_score"].double().mean())
    wanted = fake.get("wanted")
    if "logits" in fake and wanted is not None and bool((wanted >= 0).all()):
        out["class_acc"] = float((fake["logits"].argmax(1) == wanted).double().mean())
    return out


def table(rows: list[dict]) -> str:
    keys = ["run", "step", "sampler", "steps", "nfe", "guidance", "n", "fid", "kid", "kid_std", "precision", "recall"]
    keys += [k for k in ("class_acc", "clip_score") if any(k in r for r in rows)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def final_line(row: dict) -> str:
    keys = ["fid", "kid", "kid_std", "precision", "recall"] + [k for k in ("class_acc", "clip_score") if k in row]
    return " ".join(f"{k}={row[k]:.6g}" for k in keys)


def evaluate(paths: list[str], ref_source: str, extractor_spec: str, out: str | Path, *, num: int = 1000,
             ref_num: int = 0, steps=None, samplers=None, guidance: float | None = None, seed: int = 0,
             batch: int = 50, chunk: int = CHUNK, cache_dir: str | None = None, progress: bool = True,
             log=print) -> list[dict]:
    """Every (run, sampler, steps) setting; returns the result rows (rank 0 writes and prints them). ``steps`` /
    ``samplers`` / ``guidance`` None: each model's own (its stage's: a student at its own step count)."""
    from difftrain.eval.extractors import build_extractor
    from difftrain.eval.generator import count_nfe, load_generator, sampler_name
    from difftrain.eval.reference import reference_features
    from difftrain.launch.env import discover, init_distributed, pick_device

    env = discover()
    device = pick_device("auto", env.local_rank)
    if env.world_size > 1:
        init_distributed(device)
    rank, world = env.rank, env.world_size
    samplers = [sampler_name(s) for s in samplers] if samplers else None
    out = Path(out)
    extractor = build_extractor(extractor_spec, cache_dir=cache_dir, device=device)
    gens = [load_generator(p, device) for p in paths]
    sizes = {output_size(g) for g in gens}
    if len(sizes) != 1:
        raise ConfigError(f"the models make images of different sizes {sorted(sizes)}: evaluate them separately")
    (size, channels), = sizes
    ref_n = ref_num or num
    if rank == 0:  # the others read it from the cache
        ref = reference_features(ref_source, extractor, ref_n, size, channels, cache_dir, progress=progress)
    if world > 1:
        dist.barrier()
    if rank != 0:
        ref = reference_features(ref_source, extractor, ref_n, size, channels, cache_dir)
    rows = []
    for g in gens:
        w = g.sampling.guidance if guidance is None else guidance
        w = w if g.cond != "none" else 1.0
        for sampler in samplers or [g.sampling.sampler]:
            for n_steps in steps or [g.sampling.steps]:
                folder = setting_dir(out, g, extractor, sampler, n_steps, w, seed, chunk)
                fake = sample_features(g, extractor, ref, n=num, sampler=sampler, steps=n_steps, guidance=w,
                                       seed=seed, folder=folder, rank=rank, world=world, batch=batch,
                                       chunk=chunk, progress=progress and rank == 0)
                if rank != 0:
                    continue
                row = {"run": g.name, "step": g.step, "sampler": sampler, "steps": n_steps,
                       "nfe": count_nfe(sampler, n_steps, g.diffusion.path), "guidance": w, "n": num,
                       "ref_n": len(ref["captions"]), "extractor": extractor.name,
                       **score(ref, fake, kid_subset_size=min(1000, num, len(ref["captions"])))}
                rows.append(row)
                log(f"{g.name} {sampler} {n_steps} steps (NFE {row['nfe']}): " + final_line(row))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        if len({(r["nfe"]) for r in rows}) > 1:
            from difftrain.eval.plots import plot_fid_vs_nfe

            plot_fid_vs_nfe(rows, out / "fid_vs_nfe.png")
    return rows


def add_eval_args(p) -> None:
    p.add_argument("runs", nargs="+", help="run dirs or export folders (several: one line each on the plot)")
    p.add_argument("--ref", required=True, help="real images: a shard spec or an image folder")
    p.add_argument("--extractor", default="inception",
                   help="digits[:bold] | inception[:FILE] | clip:PATH (default: inception, the standard FID network)")
    # not --num: torchrun's own parser would take it for its --numa-binding
    p.add_argument("--samples", type=int, default=1000, help="generated samples per setting (FID papers: 50000)")
    p.add_argument("--ref-samples", type=int, default=0, help="reference images (default: --samples)")
    p.add_argument("--steps", help="sampler steps, comma-separated: 1,2,4,8,16,32,64 (default: each model's own)")
    p.add_argument("--sampler", help="comma-separated: euler,heun,ddim,dpmpp2m (default: each model's own)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: each model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=50, help="samples per forward pass")
    p.add_argument("--chunk", type=int, default=CHUNK, help="samples per stored (resumable) chunk")
    p.add_argument("--out", help="results folder (default: RUN/eval for the first run)")
    p.add_argument("--cache-dir", help="reference features and extractor weights (default ~/.cache/difftrain)")


def run_eval(args) -> list[dict]:
    rows = evaluate(args.runs, args.ref, args.extractor, args.out or str(Path(args.runs[0]) / "eval"),
                    num=args.samples, ref_num=args.ref_samples, steps=_split(args.steps, int) if args.steps else None,
                    samplers=_split(args.sampler, str) if args.sampler else None, guidance=args.guidance, seed=args.seed, batch=args.batch,
                    chunk=args.chunk, cache_dir=args.cache_dir)
    if rows:
        print(table(rows))
        print(final_line(rows[-1]), flush=True)
    return rows
