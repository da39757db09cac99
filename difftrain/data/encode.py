"""Pre-encoding: run the frozen VAE and text encoder over ``data.train`` once, write latent shards.

    difftrain data encode CONFIG --out DIR [key=value ...]               # one process
    torchrun --nproc_per_node=8 -m difftrain data encode CONFIG --out DIR  # or srun / mpirun

Train on the result with ``data.kind=latent data.train=DIR/{...}.tar`` (the format:
:mod:`difftrain.data.latents`). The source shards are read with :func:`tario.read_shard` and the
config's :class:`SampleDecoder`, so ``data.filters``, ``require_caption``, ``min_image_size`` and
every skip reason apply as in training; skipped samples are counted in ``NAME_stats.json`` and not
written. The encoders are the run's (``models.encoders.build_encoders``): ``encoders.vae`` (or pixel space),
``encoders.text`` when ``model.cond=text``. Video (``data.kind=video``) goes through the VAE frame
by frame (latents [T, c, h, w]).

**Deterministic.** Crops are centred and never flipped, whatever ``data.crop`` / ``data.flip`` say,
and a video clip is the middle one (every keyed uniform is 0.5): each sample has one encoding.
Batches never span two shards, so a shard's bytes depend only on the shard, the encoders, the
device type and ``--batch-size``: they are the same on any world size and after a restart.

**Distributed and restartable.** Shard ``i`` (in spec order) goes to rank ``i mod world``; ranks
share nothing but the output folder (no process group). Each output is written under
``NAME.tmp`` and renamed when complete (stats file first, the tar last), so a killed job restarts
where it stopped: shards whose ``NAME.tar`` exists are skipped (counted and printed). A shard that
cannot be opened gets a stats file with its error but no tar, so the next run retries it; a
truncated one keeps the samples before the break. A restart into a folder whose
``encode_info.json`` describes other encoders, source or dtype is refused.

Test hook: ``DIFFTRAIN_FAULT=kill_after_shard:N:RANK`` SIGKILLs rank RANK after it has written its
N-th shard of this run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
from collections import Counter
from pathlib import Path

import torch

from difftrain.config import Config, ConfigError
from difftrain.data import tario
from difftrain.data.decode import SkipSample
from difftrain.data.images import parse_buckets, to_unit
from difftrain.data.latents import FORMAT, INFO, NULL, encoder_identity, fingerprint, output_name
from difftrain.data.samples import SampleDecoder

log = logging.getLogger(__name__)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _middle(name: str) -> float:
    """Every keyed uniform of the decoder: the centre of each random range (crop, clip start)."""
    return 0.5


@torch.no_grad()
def posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels [B, C, H, W] (video [B, T, C, H, W]) -> the scaled posterior ``(mean, std)`` in the VAE's latent
    space: ``mean = (mu - shift_factor) * scaling_factor`` (bit-equal to ``VAE.encode``), ``std = sigma *
    scaling_factor``. Pixel space: ``(pixels, None)``."""
    from difftrain.models.encoders import VAE

    if not isinstance(vae, VAE):
        return pixels.float(), None
    if pixels.ndim == 5:
        B, T = pixels.shape[:2]
        mean, std = posterior(vae, pixels.flatten(0, 1))  # [B*T, c, h, w] each
        return mean.reshape(B, T, *mean.shape[1:]), std.reshape(B, T, *std.shape[1:])
    dist = vae.vae.encode(pixels.to(vae.vae.dtype)).latent_dist
    mean = ((dist.mean - vae.shift_factor) * vae.scaling_factor).float()
    return mean, (dist.std * vae.scaling_factor).float()


def with_field(data: bytes | None, name: str, value) -> bytes:
    """JSON object bytes with ``"name": value`` spliced in before the closing brace; every original byte is
    kept. A missing or non-object JSON becomes ``{"name": value}``."""
    field = json.dumps({name: value})[1:-1].encode()
    obj = None
    if data is not None:
        try:
            obj = json.loads(data)
        except ValueError:
            pass
    if not isinstance(obj, dict):
        return b"{" + field + b"}"
    end = data.rindex(b"}")
    head = data[:end]
    return head + (b"" if head.rstrip().endswith(b"{") else b", ") + field + data[end:]


def _versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def fault(kind: str, n: int, rank: int) -> bool:
    """The ``DIFFTRAIN_FAULT=kind:n:rank`` test hook (train/checkpoint.py's format; rank from the launcher)."""
    spec = os.environ.get("DIFFTRAIN_FAULT", "")
    if not spec:
        return False
    k, s, r = spec.split(":")
    return k == kind and int(s) == n and int(r) == rank


# ------------------------------------------------------------------------------------------ shared writers
# (also used by difftrain/distill/pairs.py, which writes the same layout from a teacher's samples)
def sample_stamp(identity: dict, fingerprints: dict, dtype: str) -> dict:
    """The ``"difftrain"`` field of every sample's JSON, less its per-sample ``latent_shape`` and ``size``."""
    text = {"text": identity["text"], "text_max_length": identity["text_max_length"]} if "text" in fingerprints else {}
    return {"format": FORMAT, "vae": identity["vae"], **text, "dtype": dtype, "fingerprints": fingerprints}


def folder_info(identity: dict, fingerprints: dict, text, vae, std: bool, dtype: str, source: dict,
                names: list[str], batch_size: int) -> dict:
    """``encode_info.json``: what the shards are (everything but ``job`` must match on restart). ``std``: the
    samples hold ``latent_std``."""
    from difftrain.models.encoders import VAE

    space = "vae" if isinstance(vae, VAE) else "pixels"
    latent = {"space": space, "channels": vae.latent_channels,
              "downsample_factor": vae.downsample_factor, "scaling_factor": vae.scaling_factor,
              "shift_factor": vae.shift_factor, "std": std, "dtype": dtype}
    text_info = None if text is None else {"dim": text.dim, "length": text.max_length, "dtype": dtype}
    libs = ("torch", "safetensors") + (("diffusers",) if space == "vae" else ()) + \
        (("transformers",) if text_info else ())
    from difftrain import __version__

    return {"format": FORMAT, "encoders": identity, "fingerprints": fingerprints, "latent": latent,
            "text": text_info, "null": NULL if text_info else None, "source": source, "shards": names,
            "job": {"batch_size": batch_size, "versions": {"difftrain": __version__, **_versions(*libs)}}}


def null_bytes(text, device) -> bytes:
    """``null.safetensors``: the encoding of "" (TextEncoder.null_states), float32 whatever ``--dtype``."""
    from safetensors.torch import save

    states, mask = text.null_states(1, device)
    return save({"text_states": states[0].float().cpu().contiguous(),
                 "text_mask": mask[0].to(torch.uint8).cpu().contiguous()})


def sample_tensors(tensors: dict) -> bytes:
    """One sample's safetensors bytes: each tensor its own contiguous bytes, not a view of the batch."""
    from safetensors.torch import save

    return save({k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()})


@contextlib.contextmanager
def tar_stream(path: Path):
    """A webdataset ``TarWriter`` on ``path`` whose bytes depend only on what is written: member mtime 0 and
    webdataset's fixed mode, owner and USTAR format. Closed, flushed and fsynced on leaving (the caller renames)."""
    import webdataset as wds

    with open(path, "wb") as f:
        sink = wds.TarWriter(f, encoder=False, mtime=0.0)
        try:
            yield sink
        finally:
            sink.close()  # also on error, so the tar stream never writes to a closed file
        f.flush()
        os.fsync(f.fileno())


def prepare_folder(out: Path, info: dict, rank: int, null, refuse) -> None:
    """Rank 0 writes ``null.safetensors`` (the bytes ``null()`` gives; none when ``null`` is None) then
    ``encode_info.json`` (temp + rename). Every rank compares an existing info with ``info`` and raises
    ``ConfigError(refuse(keys))`` where they differ (:func:`info_diff`)."""
    path = out / INFO
    if path.is_file():
        diff = info_diff(json.loads(path.read_text()), json.loads(json.dumps(info)))
        if diff:
            raise ConfigError(refuse(diff))
        return
    if rank != 0:
        return
    if null is not None:
        (out / (NULL + ".tmp")).write_bytes(null())
        os.replace(out / (NULL + ".tmp"), out / NULL)
    (out / (INFO + ".tmp")).write_text(json.dumps(info, indent=1))
    os.replace(out / (INFO + ".tmp"), path)


def info_diff(old: dict, new: dict) -> list[str]:
    """The keys whose values differ, ``job`` aside, sorted; inside a dict on both sides, its differing keys
    (``latent.dtype``, ``pairs.steps``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == "job" or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{kk}" for kk in sorted(set(a) | set(b)) if a.get(kk) != b.get(kk)]
        else:
            out.append(k)
    return out


class ShardEncoder:
    """Source shard -> latent shard, with one rank's frozen encoders."""

    def __init__(self, cfg: Config, text, vae, device: torch.device | str = "cpu", dtype: str = "float16",
                 batch_size: int = 64):
        from difftrain.models.encoders import VAE

        d = cfg.data
        if d.kind == "latent":
            raise ConfigError("config key 'data.kind' = 'latent': data.train already holds latents; "
                              "encode the image or video shards they came from")
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
        if batch_size <= 0:
            raise ConfigError(f"--batch-size must be > 0, got {batch_size}")
        if (cfg.model.cond == "text") != (text is not None):  # build_encoders gives one exactly then
            raise ValueError(f"model.cond={cfg.model.cond!r}: pass a text encoder exactly when model.cond=text")
        self.cfg, self.text, self.vae, self.device = cfg, text, vae, torch.device(device)
        self.dtype_name, self.dtype, self.batch_size = dtype, DTYPES[dtype], batch_size
        self.decoder = SampleDecoder(d.kind, d.channels, parse_buckets(d.buckets, d.image_size), "center", False,
                                     d.min_image_size, d.require_caption, d.filters, d.frames, d.frame_stride, d.fps)
        self.identity = encoder_identity(cfg.encoders, cfg.model.cond, d.channels)
        self.fingerprints = {"vae": fingerprint(vae), **({"text": fingerprint(text)} if text is not None else {})}
        self.has_std = isinstance(vae, VAE)
        self.stamp = sample_stamp(self.identity, self.fingerprints, dtype)

    # -------------------------------------------------------------------------- folder files
    def info(self, names: list[str]) -> dict:
        """``encode_info.json`` (:func:`folder_info`) of this encoding of ``names``."""
        d = self.cfg.data
        source = {"train": d.train, "kind": d.kind, "channels": d.channels, "image_size": d.image_size,
                  "buckets": [list(b) for b in self.decoder.buckets], "crop": "center", "flip": False,
                  "min_image_size": d.min_image_size, "require_caption": d.require_caption, "filters": d.filters}
        if d.kind == "video":
            source.update(frames=d.frames, frame_stride=d.frame_stride, fps=d.fps)
        return folder_info(self.identity, self.fingerprints, self.text, self.vae, self.has_std, self.dtype_name,
                           source, names, self.batch_size)

    # -------------------------------------------------------------------------- one shard
    def shard(self, url: str, path: Path) -> dict:
        """Encode ``url`` into ``path`` (and ``NAME_stats.json``), via temp names; returns the stats."""
        stem = path.name[:-4] if path.name.endswith(".tar") else path.name
        stats_path = path.with_name(stem + "_stats.json")
        tmp = {p: p.with_name(p.name + ".tmp") for p in (path, stats_path)}
        stats = {"source": url, "samples": 0, "written": 0, "skipped": Counter(), "error": None}
        try:
            with tar_stream(tmp[path]) as sink:
                pending: list[tuple[dict, dict]] = []
                try:
                    for raw, _ in tario.read_shard(url):
                        stats["samples"] += 1
                        item = self._decode(raw, stats["skipped"])
                        if item is not None:
                            pending.append((raw, item))
                        if len(pending) == self.batch_size:
                            stats["written"] += self._write(sink, pending)
                            pending = []
                except tario.ShardError as e:  # unreadable: no samples; truncated: those before the break
                    stats["skipped"][e.reason] += 1
                    stats["error"] = str(e)
                    log.warning("encode: %s", e)
                stats["written"] += self._write(sink, pending)
            stats["skipped"] = dict(sorted(stats["skipped"].items()))
            tmp[stats_path].write_text(json.dumps(stats, indent=1))
            os.replace(tmp[stats_path], stats_path)
            if stats["skipped"].get("shard_unreadable"):
                return stats  # no tar: the next run tries again
            os.replace(tmp[path], path)  # last: the tar marks the shard done
        finally:
            for p in tmp.values():
                p.unlink(missing_ok=True)
        return stats

    def _decode(self, raw: dict, skipped: Counter) -> dict | None:
        try:
            return self.decoder(raw, _middle)
        except SkipSample as e:
            skipped[e.reason] += 1
        except Exception:  # bad bytes are data, not a crash (as in the loader)
            skipped["decode_error"] += 1
        return None

    @torch.no_grad()
    def _write(self, sink, pending: list[tuple[dict, dict]]) -> int:
        """Encode one batch (grouped by shape: buckets) and write its samples in their order."""
        if not pending:
            return 0
        means, stds = [None] * len(pending), [None] * len(pending)
        groups: dict[tuple, list[int]] = {}
        for i, (_, item) in enumerate(pending):
            groups.setdefault(tuple(item["pixels"].shape), []).append(i)
        for ids in groups.values():
            x = to_unit(torch.stack([pending[i][1]["pixels"] for i in ids]).to(self.device))  # [b, C, H, W] / [b, T, C, H, W]
            mean, std = (None if t is None else t.to(self.dtype).cpu() for t in posterior(self.vae, x))
            for j, i in enumerate(ids):
                means[i], stds[i] = mean[j], None if std is None else std[j]
        if self.text is not None:
            states, mask = self.text.encode([item["caption"] for _, item in pending], self.device)  # [n, L, D], [n, L]
            states, mask = states.to(self.dtype).cpu(), mask.to(torch.uint8).cpu()
        for i, (raw, item) in enumerate(pending):
            tensors = {"latent_mean": means[i]}
            if stds[i] is not None:
                tensors["latent_std"] = stds[i]
            if self.text is not None:
                tensors["text_states"], tensors["text_mask"] = states[i], mask[i]
            stamp = {**self.stamp, "latent_shape": list(tensors["latent_mean"].shape),
                     "size": list(item["pixels"].shape[-2:])}
            sample = {"__key__": raw["__key__"], "safetensors": sample_tensors(tensors),
                      "json": with_field(raw.get("json"), "difftrain", stamp)}
            sample.update({m: raw[m] for m in ("txt", "cls") if m in raw})
            sink.write(sample)
        return len(pending)


# ------------------------------------------------------------------------------------------ job
def _prepare_folder(out: Path, enc: ShardEncoder, info: dict, rank: int) -> None:
    """Rank 0 writes ``null.safetensors`` then ``encode_info.json``; every rank refuses a folder whose info
    describes something else."""
    prepare_folder(out, info, rank, None if enc.text is None else lambda: null_bytes(enc.text, enc.device),
                   lambda diff: f"--out {out} holds latents of another encoding ({', '.join(diff)} differ in {INFO}); "
                                f"use a new folder or the same config, overrides and --dtype")


def summarize(out: Path, names: list[str]) -> dict:
    """Totals over every shard's stats file in ``out`` (whichever rank wrote it)."""
    total = {"shards": len(names), "done": 0, "samples": 0, "written": 0, "skipped": Counter(), "failed": []}
    for n in names:
        stem = n[:-4] if n.endswith(".tar") else n
        f = out / f"{stem}_stats.json"
        if (out / n).is_file():
            total["done"] += 1
        if not f.is_file():
            continue
        st = json.loads(f.read_text())
        if not (out / n).is_file():
            if st["skipped"].get("shard_unreadable"):
                total["failed"].append(f"{st['source']}: {st['error']}")
            continue
        total["samples"] += st["samples"]
        total["written"] += st["written"]
        total["skipped"].update(st["skipped"])
    total["skipped"] = dict(sorted(total["skipped"].items()))
    return total


def encode(cfg: Config, out_dir, text, vae, device: torch.device | str = "cpu", dtype: str = "float16",
           batch_size: int = 64, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Encode this rank's shards of ``cfg.data.train`` (``i mod world == rank``) into ``out_dir``; returns
    :func:`summarize` of the folder as this rank leaves it, plus ``"skipped_existing"`` (shards found done)."""
    from tqdm import tqdm

    from difftrain.data.spec import parse_spec

    enc = ShardEncoder(cfg, text, vae, device, dtype, batch_size)
    urls = [u for s in parse_spec(cfg.data.train) for u in s.urls]
    names = [output_name(u) for u in urls]
    seen: dict[str, str] = {}
    for u, n in zip(urls, names):
        if n in seen:
            raise ConfigError(f"config key 'data.train': shards {seen[n]} and {u} would both be written to {n}; "
                              f"encode each source into its own --out")
        seen[n] = u
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_folder(out, enc, enc.info(names), rank)
    mine = [(u, n) for i, (u, n) in enumerate(zip(urls, names)) if i % world == rank]
    todo = [(u, n) for u, n in mine if not (out / n).is_file()]
    print(f"encode rank {rank}/{world}: {len(mine)} shard(s), {len(mine) - len(todo)} already encoded (skipped), "
          f"{len(todo)} to go", flush=True)
    written = 0
    with tqdm(total=len(todo), desc="encode", unit="shard", disable=rank != 0 or not progress) as bar:
        for k, (u, n) in enumerate(todo, 1):
            written += enc.shard(u, out / n)["written"]
            bar.update(1)
            bar.set_postfix(samples=written)
            if fault("kill_after_shard", k, rank):
                os.kill(os.getpid(), signal.SIGKILL)
    total = summarize(out, names)
    total["skipped_existing"] = len(mine) - len(todo)
    return total


def add_encode_args(parser: argparse.ArgumentParser) -> None:
    """The ``data encode`` arguments: ``CONFIG [key=value ...] --out DIR [key=value ...]``."""
    parser.add_argument("config", help="YAML run config: its data.* (source shards, decoding) and encoders.*")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.image_size=256")
    parser.add_argument("--out", required=True, nargs="+", action=_OutAndOverrides, metavar="DIR",
                        help="output folder for the latent shards (overrides may follow it)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="storage dtype of latents and text states (the null condition is always float32)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per encoder call, per rank")


class _OutAndOverrides(argparse.Action):
    """``--out DIR k=v ...``: argparse cannot match positionals after an option once it has matched the
    positional list, so overrides that follow ``--out`` are taken here."""

    def __call__(self, parser, namespace, values, option_string=None):
        out, *rest = values
        bad = [v for v in rest if "=" not in v]
        if bad:
            parser.error(f"--out takes one folder; {bad[0]!r} is not a key=value override (put CONFIG first)")
        namespace.out = out
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + rest


def run_encode(args) -> dict:
    """Run :func:`encode` from parsed :func:`add_encode_args` arguments on this process's rank (torchrun, srun,
    mpirun or one process). Prints a one-line summary; raises :class:`~difftrain.data.loader.DataError` when
    a shard of this rank could not be read (rerun to retry it)."""
    from difftrain.config_checks import load_config
    from difftrain.launch.env import discover, pick_device
    from difftrain.models.encoders import build_encoders

    cfg = load_config(args.config, args.overrides)
    env = discover()
    device = pick_device(cfg.run.device, env.local_rank)
    text, vae = build_encoders(cfg.encoders, cfg.model.cond, cfg.data.channels, device)
    res = encode(cfg, args.out, text, vae, device, args.dtype, args.batch_size, env.rank, env.world_size,
                 cfg.run.progress)
    print(f"encode rank {env.rank}/{env.world_size}: {res['done']}/{res['shards']} shards of {args.out} done, "
          f"{res['written']} samples written, skipped {res['skipped']}", flush=True)
    if res["failed"]:
        from difftrain.data.loader import DataError

        raise DataError(f"{len(res['failed'])} shard(s) could not be read (rerun to retry): {res['failed'][:3]}")
    return res
