"""Reflow pairs: a teacher ODE's (noise, sample) pairs, written as latent shards the loader reads (Liu et al. 2022,
"Flow Straight and Fast", sec. 2.2-2.3: reflow trains on the coupling (z, Phi(z)); InstaFlow, Liu et al. 2024).

    difftrain distill pairs TEACHER --out DIR --count N [--solver euler|heun|ddim|dpmpp_2m] [--steps S]
        [--guidance W] [--batch B] [--shard-size K] [--seed S] [--dtype float32|float16] [--prompt TEXT ...]
    torchrun --nproc_per_node=8 -m difftrain distill pairs TEACHER --out DIR --count N   # or srun / mpirun

``TEACHER`` is a run dir (its newest complete checkpoint's EMA weights) or a ``difftrain export`` folder
(:func:`difftrain.eval.generator.load_generator`); solver, steps and CFG scale default to the teacher's own
(``Generator.sampling``). Pair ``i`` is

    z_i  = keyed_randn(seed, 0, [i], shape, "sample")   the starting noise of ``difftrain sample``'s image i
    x^_i = Phi(z_i)                                      the teacher's ODE from t = 1 to 0 (sampling.sample_model_space)

in MODEL space (latents when the teacher has a VAE, else pixels in [-1, 1]; nothing is decoded), with sample i's
condition: class label ``i mod num_classes``, prompt ``i mod len(prompts)`` (default: the teacher's
``run.sample_prompts``), or none; the CFG scale applies through the same guided denoiser as sampling.

**Layout** (:mod:`difftrain.data.latents`, written with data/encode.py's writers): ``DIR/00000.tar ...``, shard k
holding pairs ``k*K ... (k+1)*K - 1`` (the last may be short), keys ``f"{i:09d}"``; per sample
``KEY.safetensors`` {``latent_mean`` = x^_i, ``noise`` = z_i, and for text teachers ``text_states`` /
``text_mask``, the caption's encoding}, ``KEY.cls`` (label) or ``KEY.txt`` (caption), ``KEY.json``
({"difftrain": stamp}). Beside them ``encode_info.json`` (what ``latents.load_latent_data`` checks, plus a
``pairs`` block: teacher path, step and weight fingerprint, solver, steps, guidance, seed, count, batch,
shard size, dtype, shape, conditions) and, for text teachers, ``null.safetensors``. Train a student on them with
``data.kind=latent data.train=DIR/{00000..0000N}.tar`` and the teacher's encoders (a class or unconditional student
with ``data.require_caption=false``: its pairs have labels, no captions); its batches carry ``noise``.

**Byte-identical on any world size.** Pairs are computed in fixed chunks of ``--batch`` (chunk c = pairs
``c*B ... (c+1)*B - 1``): batched CPU math can depend on the batch, so a chunk's pairs are always computed together.
``--shard-size`` is a multiple of ``--batch``, and shard k is written whole by rank ``k mod world``: the shards'
bytes depend on the request, the teacher and the device type only.

**Restartable.** A shard is written under ``NAME.tmp`` and renamed when complete; a rerun skips the shards that
exist, so a killed job rerun ends with the same bytes as an uninterrupted one. A rerun into a folder whose
``encode_info.json`` describes another request (or teacher) is refused in one line naming the key.

Test hook: ``DIFFTRAIN_FAULT=kill_after_shard:N:RANK`` SIGKILLs rank RANK after it has written its N-th shard of
this run.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
from pathlib import Path

import torch

from difftrain.config import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def read_captions(spec: str, count: int) -> list[str]:
    """The first ``count`` captions (``KEY.txt``) of a shard spec, in shard and sample order (samples without one are
    passed over); fewer when the shards hold fewer (then they are cycled). ``ConfigError`` naming ``--captions-from``
    when there are none."""
    from difftrain.data.spec import parse_spec
    from difftrain.data.tario import ShardError, read_shard

    out: list[str] = []
    try:
        for source in parse_spec(spec, "--captions-from"):
            for url in source.urls:
                for sample, _ in read_shard(url):
                    if "txt" in sample:
                        out.append(sample["txt"].decode("utf-8", "replace").strip())
                        if len(out) == count:
                            return out
    except (ShardError, ValueError, OSError) as e:
        raise ConfigError(f"--captions-from {spec}: {e}") from None
    if not out:
        raise ConfigError(f"--captions-from {spec}: no sample has a caption (KEY.txt)")
    return out


def shard_name(k: int) -> str:
    return f"{k:05d}.tar"


class PairWriter:
    """One rank's view of a pairs job: the teacher (a :class:`~difftrain.eval.generator.Generator`) and the request,
    checked; computes chunks and writes shards."""

    def __init__(self, g, teacher: str | Path, count: int, *, solver: str | None = None, steps: int | None = None,
                 guidance: float | None = None, batch: int = 64, shard_size: int = 1024, seed: int = 0,
                 dtype: str = "float32", prompts: list[str] | None = None, captions_from: str | None = None):
        from difftrain.data.latents import encoder_identity, fingerprint
        from difftrain.eval.generator import sampler_name
        from difftrain.sampling import sample_shape

        if count < 1:
            raise ConfigError(f"--count must be >= 1, got {count}")
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {batch}")
        if shard_size < batch or shard_size % batch:
            raise ConfigError(f"--shard-size {shard_size} must be a positive multiple of --batch {batch} "
                              "(a shard holds whole chunks)")
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
        if (prompts or captions_from) and g.cond != "text":
            raise ConfigError(f"--prompt / --captions-from are for text-conditioned teachers; {teacher} is "
                              f"model.cond={g.cond!r}")
        if prompts and captions_from:
            raise ConfigError("give --prompt or --captions-from, not both")
        how = g.sampling
        self.solver = sampler_name(solver or (how.sampler if how else g.cfg.run.sample_sampler))
        self.steps = int(steps if steps is not None else how.steps if how else g.cfg.run.sample_steps)
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        self.guidance = float(guidance if guidance is not None else how.guidance if how else g.cfg.run.sample_guidance)
        self.g, self.count, self.batch, self.shard_size, self.seed = g, count, batch, shard_size, seed
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.captions_from = captions_from
        if captions_from:  # the training data's own captions, in shard order: the pairs follow its distribution
            prompts = read_captions(captions_from, count)
        self.prompts = list(prompts or g.cfg.run.sample_prompts) if g.cond == "text" else None
        if self.prompts == []:
            raise ConfigError(f"--prompt: the text-conditioned teacher {teacher} has no run.sample_prompts (an export "
                              "keeps none); give the captions to pair with --prompt (repeatable, cycled)")
        self.num_classes = g.cfg.model.num_classes
        self.shape = tuple(sample_shape(g.acfg))  # model space: (C, h, w) or (T, C, h, w)
        self.text = g.conditioner.text_encoder if g.cond == "text" else None
        self.size = [g.acfg.image_size * g.vae.downsample_factor] * 2  # pixels (a student's data.image_size)
        self.identity = encoder_identity(g.cfg.encoders, g.cfg.model.cond, g.cfg.data.channels)
        self.fingerprints = {"vae": fingerprint(g.vae), **({"text": fingerprint(self.text)} if self.text is not None else {})}
        self.teacher = str(Path(teacher).resolve())
        self.teacher_fingerprint = fingerprint(g.model)
        self.shards = -(-count // shard_size)

    # -------------------------------------------------------------------------- folder
    def names(self) -> list[str]:
        return [shard_name(k) for k in range(self.shards)]

    def info(self) -> dict:
        """``encode_info.json``: data/encode.py's (``latents.load_latent_data`` reads it) plus ``pairs``."""
        from difftrain.data.encode import folder_info

        source = {"kind": "pairs", "channels": self.g.cfg.data.channels, "image_size": self.size[0],
                  "buckets": [self.size], "frames": self.shape[0] if len(self.shape) == 4 else 0}
        info = folder_info(self.identity, self.fingerprints, self.text, self.g.vae, False, self.dtype_name, source,
                           self.names(), self.batch)
        if self.captions_from:  # a hash stands for what may be millions of captions
            digest = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]
            captions = {"captions_from": self.captions_from, "captions": len(self.prompts), "captions_sha256": digest}
        else:
            captions = {"prompts": self.prompts} if self.prompts is not None else {}
        conditions = {"cond": self.g.cond, **captions,
                      **({"num_classes": self.num_classes} if self.g.cond == "class" else {})}
        info["pairs"] = {"teacher": self.teacher, "step": self.g.step, "fingerprint": self.teacher_fingerprint,
                         "solver": self.solver, "steps": self.steps, "guidance": self.guidance, "seed": self.seed,
                         "count": self.count, "batch": self.batch, "shard_size": self.shard_size,
                         "dtype": self.dtype_name, "shape": list(self.shape), **conditions}
        return info

    def prepare(self, out: Path, rank: int) -> None:
        """Rank 0 writes ``encode_info.json`` (and ``null.safetensors``); a folder of another request is refused."""
        from difftrain.data.encode import null_bytes, prepare_folder
        from difftrain.data.latents import INFO

        out.mkdir(parents=True, exist_ok=True)
        null = None if self.text is None else (lambda: null_bytes(self.text, self.g.device))
        prepare_folder(out, self.info(), rank, null,
                       lambda diff: f"--out {out} holds other pairs: {', '.join(diff)} in its {INFO} differ from "
                                    "this request; use a new folder or the same teacher and options")

    # -------------------------------------------------------------------------- pairs
    def conditions(self, lo: int, hi: int) -> tuple[list[str] | None, torch.Tensor | None]:
        """Pairs ``lo ... hi - 1``'s captions / labels (``sampling.default_conditions``' rule for sample i)."""
        if self.g.cond == "text":
            return [self.prompts[i % len(self.prompts)] for i in range(lo, hi)], None
        if self.g.cond == "class":
            return None, torch.arange(lo, hi) % self.num_classes
        return None, None

    @torch.no_grad()
    def chunk(self, lo: int, hi: int) -> list[dict]:
        """Pairs ``lo ... hi - 1``, computed together as one batch: webdataset samples in order."""
        import json

        from difftrain.data.encode import sample_stamp, sample_tensors
        from difftrain.diffusion.keyed import keyed_randn
        from difftrain.sampling import sample_model_space

        g = self.g
        captions, labels = self.conditions(lo, hi)
        cond = g.conditioner(captions, labels)
        z = keyed_randn(self.seed, 0, range(lo, hi), self.shape, "sample")  # [b, *shape] float32, CPU
        x0 = sample_model_space(g.model, g.diffusion, g.conditioner, z.to(g.device), cond, steps=self.steps,
                                sampler=self.solver, guidance=self.guidance)  # [b, *shape]
        x0, z = x0.to(self.dtype).cpu(), z.to(self.dtype)
        if self.text is not None:
            states, mask = cond["text_states"].to(self.dtype).cpu(), cond["text_mask"].to(torch.uint8).cpu()
        stamp = {**sample_stamp(self.identity, self.fingerprints, self.dtype_name), "latent_shape": list(self.shape),
                 "size": self.size}
        out = []
        for j, i in enumerate(range(lo, hi)):
            tensors = {"latent_mean": x0[j], "noise": z[j]}
            if self.text is not None:
                tensors["text_states"], tensors["text_mask"] = states[j], mask[j]
            sample = {"__key__": f"{i:09d}", "safetensors": sample_tensors(tensors),
                      "json": json.dumps({"difftrain": stamp}).encode()}
            if captions is not None:
                sample["txt"] = captions[j].encode()
            if labels is not None:
                sample["cls"] = str(int(labels[j])).encode()
            out.append(sample)
        return out

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.count, (k + 1) * self.shard_size)

    def shard(self, k: int, path: Path, bar=None) -> int:
        """Write shard ``k`` to ``path`` via ``path.tmp`` (renamed when complete); returns its pair count."""
        from difftrain.data.encode import tar_stream

        lo, hi = self.bounds(k)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tar_stream(tmp) as sink:
                for c in range(lo, hi, self.batch):
                    for sample in self.chunk(c, min(hi, c + self.batch)):
                        sink.write(sample)
                    if bar is not None:
                        bar.update(min(hi, c + self.batch) - c)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return hi - lo


def write_pairs(writer: PairWriter, out_dir, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Write this rank's shards (``k mod world == rank``) of ``writer``'s pairs into ``out_dir``, skipping those
    that exist; returns ``{"shards", "mine", "skipped_existing", "written"}`` (pairs written by this rank)."""
    from tqdm import tqdm

    from difftrain.data.encode import fault

    out = Path(out_dir)
    writer.prepare(out, rank)
    mine = [k for k in range(writer.shards) if k % world == rank]
    todo = [k for k in mine if not (out / shard_name(k)).is_file()]
    total = sum(hi - lo for lo, hi in map(writer.bounds, todo))
    written = 0
    with tqdm(total=total, desc="pairs", unit="pair", disable=rank != 0 or not progress) as bar:
        for n, k in enumerate(todo, 1):
            written += writer.shard(k, out / shard_name(k), bar)
            if fault("kill_after_shard", n, rank):
                os.kill(os.getpid(), signal.SIGKILL)
    return {"shards": writer.shards, "mine": len(mine), "skipped_existing": len(mine) - len(todo),
            "written": written}


def add_pairs_args(parser: argparse.ArgumentParser) -> None:
    from difftrain.diffusion.samplers import SAMPLERS

    parser.add_argument("teacher", help="the teacher: a run dir (its EMA weights) or a 'difftrain export' folder")
    parser.add_argument("--out", required=True, help="output folder for the pair shards")
    parser.add_argument("--count", type=int, required=True, help="number of pairs")
    parser.add_argument("--solver", help=f"{' | '.join(SAMPLERS)} (default: the teacher's sampler)")
    parser.add_argument("--steps", type=int, help="solver steps (default: the teacher's)")
    parser.add_argument("--guidance", type=float, help="CFG scale w (default: the teacher's)")
    parser.add_argument("--batch", type=int, default=64, help="pairs computed together (the same on any world size)")
    parser.add_argument("--shard-size", type=int, default=1024, help="pairs per shard, a multiple of --batch")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (pair i starts from sample i's noise)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="storage dtype of x^, z and text states (float32 keeps them exact)")
    parser.add_argument("--prompt", action="append", help="caption (repeat for several; cycled; text teachers; "
                                                          "default: the teacher's run.sample_prompts)")
    parser.add_argument("--captions-from", help="a shard spec: pair the first COUNT captions (KEY.txt) of these "
                                                "shards, in order (text teachers; e.g. the teacher's data.train)")


def run_pairs(args) -> dict:
    """``difftrain distill pairs`` on this process's rank (torchrun, srun, mpirun or one process); rank 0 prints a
    one-line summary."""
    from difftrain.eval.generator import load_generator
    from difftrain.launch.env import discover, init_distributed, pick_device, shutdown

    env = discover()
    device = pick_device("auto", env.local_rank)
    g = load_generator(args.teacher, device)
    writer = PairWriter(g, args.teacher, args.count, solver=args.solver, steps=args.steps, guidance=args.guidance,
                        batch=args.batch, shard_size=args.shard_size, seed=args.seed, dtype=args.dtype,
                        prompts=args.prompt, captions_from=args.captions_from)
    writer.prepare(Path(args.out), env.rank)  # every request error before any process group
    try:
        if env.world_size > 1:
            import torch.distributed as dist

            init_distributed(device)
        res = write_pairs(writer, args.out, env.rank, env.world_size)
        if env.world_size > 1:
            dist.barrier()  # every rank's shards are written before rank 0 counts them
        if env.rank == 0:
            done = sum((Path(args.out) / n).is_file() for n in writer.names())
            print(f"pairs: {done}/{writer.shards} shards ({writer.count} pairs) of teacher step {g.step} "
                  f"({writer.solver}, {writer.steps} steps, guidance {writer.guidance:g}) in {args.out}, "
                  f"{res['skipped_existing']} of rank 0's already there; train with data.kind=latent "
                  f"data.train={args.out}/{{00000..{writer.shards - 1:05d}}}.tar", flush=True)
    finally:
        shutdown()
    return res
