"""The real images samples are compared with: read from shards or a folder, featurised once, cached.

A reference set is the first ``n`` good samples of one pass over a shard spec (the loader's seeded shard
order, no shuffle buffer) or the first ``n`` images of a folder in sorted order, brought to the model's
resolution by the training transform (cover resize + center crop), so real and generated images differ
only in where they come from. Captions and labels come along: the generated set is conditioned on them.

Features are cached per (data, extractor) in ``cache_dir/ref_<hash>.safetensors``; the hash covers the
source (spec or folder, with every file's size and mtime), ``n``, the resolution and the extractor's
fingerprint, so changed data or another network never reuses stale statistics.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def _files(source: str) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        from difftrain.data.folder import find_images

        return [p / f for f in find_images(p)]
    from difftrain.data.spec import parse_spec

    return [Path(u) for s in parse_spec(source) for u in s.urls if not u.startswith("pipe:")]


def source_id(source: str) -> str:
    """What identifies the data: the spec and each local file's name, size and mtime."""
    parts = [source]
    for f in _files(source):
        try:
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            raise FileNotFoundError(f"reference data: '{f}' (from '{source}') does not exist") from None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_reference(source: str, n: int, image_size: int, channels: int, progress: bool = False) -> dict:
    """``{"images": uint8 [m, H, W, C], "labels": long [m] (-1 unknown), "captions": list[str]}`` with
    ``m = min(n, size of the data)``: the first ``n`` good samples of one pass."""
    if n <= 0:
        raise ValueError(f"reference set size must be > 0, got {n}")
    if Path(source).is_dir():
        return _read_folder(Path(source), n, image_size, channels)
    from tqdm import tqdm

    from difftrain.data.loader import ShardLoader
    from difftrain.data.samples import SampleDecoder

    decoder = SampleDecoder("image", channels, [(image_size, image_size)])
    batch = 32
    it = iter(ShardLoader(source, batch, decoder=decoder, seed=0, key="eval.ref"))
    images, labels, captions = [], [], []
    with tqdm(total=n, desc="reference", unit="img", disable=not progress) as bar:
        while len(captions) < n:
            b = next(it)
            first = [i for i, e in enumerate(b["epochs"].tolist()) if e == 0][: n - len(captions)]
            images.append(b["pixels"][first].permute(0, 2, 3, 1))
            labels.append(b["labels"][first])
            captions += [b["captions"][i] for i in first]
            bar.update(len(first))
            if len(first) < len(b["epochs"]):  # the pass is over
                break
    if not captions:
        raise ValueError(f"reference data '{source}' has no readable images")
    return {"images": torch.cat(images).contiguous(), "labels": torch.cat(labels), "captions": captions}


def _read_folder(root: Path, n: int, image_size: int, channels: int) -> dict:
    from PIL import Image

    from difftrain.data.images import ImageTransform
    from difftrain.data.folder import find_images

    names = find_images(root)[:n]
    if not names:
        raise ValueError(f"reference folder '{root}' has no images")
    tf = ImageTransform(channels)
    images, captions = [], []
    for name in names:
        with Image.open(root / name) as img:
            img.load()
            images.append(tf(img, (image_size, image_size), lambda _: 0.5).permute(1, 2, 0))
        txt = (root / name).with_suffix(".txt")
        captions.append(txt.read_text().strip() if txt.is_file() else "")
    return {"images": torch.stack(images), "labels": torch.full((len(names),), -1, dtype=torch.long),
            "captions": captions}


@torch.no_grad()
def featurize(extractor, images: torch.Tensor, batch: int = 100) -> dict[str, torch.Tensor]:
    """uint8 [N, H, W, C] -> ``{"features": [N, D]}`` (+ ``"logits"``), in batches, on the CPU."""
    out: dict[str, list] = {}
    for lo in range(0, len(images), batch):
        for k, v in extractor(images[lo:lo + batch]).items():
            out.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def reference_features(source: str, extractor, n: int, image_size: int, channels: int,
                       cache_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Reference features, labels and captions, from the cache when the same (data, extractor) was done."""
    from safetensors.torch import load_file, save_file

    from difftrain.eval.extractor_base import default_cache_dir

    cache = default_cache_dir(cache_dir)
    key = hashlib.sha256(f"{source_id(source)}|{n}|{image_size}|{channels}|{extractor.fingerprint}".encode())
    path = cache / f"ref_{key.hexdigest()[:20]}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        out = dict(load_file(str(path)))
        out["captions"] = json.loads(meta["captions"])
        return out
    ref = read_reference(source, n, image_size, channels, progress)
    out = {**featurize(extractor, ref["images"]), "labels": ref["labels"]}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp),
              metadata={"captions": json.dumps(ref["captions"]), "source": source, "extractor": extractor.name})
    tmp.replace(path)  # a concurrent writer produces the same bytes
    return {**out, "captions": ref["captions"]}
