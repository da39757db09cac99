"""A tiny real data set in the img2dataset shard layout: scikit-learn's handwritten digits.

1,797 8x8 images (values 0..16) are scaled to 0..255, up-sampled (bicubic) to ``image_size`` px
and written as one-channel PNGs with a caption and a JSON record, exactly the members
img2dataset writes::

    out/train/00000.tar   000000000.png  000000000.txt  000000000.json  000000001.png ...
    out/val/00000.tar     ...

Keys are 9-digit, zero padded and unique across both splits. The order is a permutation drawn
from ``seed``; the first ``val_fraction`` of it is the held-out split. The tars are byte-for-byte
reproducible (fixed mtime).

``style`` renders the same digits (same split, keys, labels and captions) another way, for fine-tuning a digits
model to a look it has not seen (:data:`STYLES`): ``plain`` is the above; ``bold`` thickens every stroke by a
grey-scale dilation of the up-sampled image with a 3x3 cross (each pixel becomes the maximum of itself and its four
neighbours), repeated ``image_size // 16`` times (at least once), so strokes grow by about one 8x8 cell's worth at
any size (about 1.5x the ink at 16 px).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm


def digit_arrays(val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The digits in the demo's order: ``(uint8 [N, 8, 8] in 0..255, labels [N], num_val)``.

    The order is a permutation drawn from ``seed``; the first ``num_val`` are the held-out split.
    """
    from sklearn.datasets import load_digits

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    images = np.round(digits.images[order] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target[order], int(round(len(order) * val_fraction))


def upsample(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [8, 8] -> uint8 [image_size, image_size] (PIL bicubic): the pixels the demo writes."""
    from PIL import Image

    return np.array(Image.fromarray(pixels).resize((image_size, image_size), Image.BICUBIC))


def embolden(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> uint8 [H, W]: strokes thickened by grey-scale dilation with a 3x3 cross (scipy.ndimage),
    ``max(1, H // 16)`` times."""
    from scipy.ndimage import generate_binary_structure, grey_dilation

    cross = generate_binary_structure(2, 1)
    for _ in range(max(1, pixels.shape[0] // 16)):
        pixels = grey_dilation(pixels, footprint=cross, mode="constant", cval=0)
    return pixels


STYLES = {"plain": lambda pixels: pixels, "bold": embolden}  # style name -> uint8 [H, W] -> uint8 [H, W]


def render(pixels: np.ndarray, image_size: int, style: str = "plain") -> np.ndarray:
    """uint8 [8, 8] -> uint8 [image_size, image_size]: up-sampled, then drawn in ``style`` (a key of STYLES)."""
    if style not in STYLES:
        raise ValueError(f"unknown digits style {style!r}: expected one of {', '.join(STYLES)}")
    return STYLES[style](upsample(pixels, image_size))


def _png(pixels: np.ndarray, image_size: int, style: str = "plain") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render(pixels, image_size, style)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, samples, shard_size: int, bar) -> str:
    """Write webdataset sample dicts into ``folder/00000.tar, 00001.tar, ...`` (``shard_size`` each,
    fixed mtime so the tars are reproducible); returns the brace spec of the shards."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    sink, last = None, 0
    for n, sample in enumerate(samples):
        if n % shard_size == 0:
            if sink is not None:
                sink.close()
            last = n // shard_size
            sink = wds.TarWriter(str(folder / f"{last:05d}.tar"), encoder=False, mtime=0.0)
        sink.write(sample)
        bar.update(1)
    if sink is not None:
        sink.close()
    return f"{folder}/{{00000..{last:05d}}}.tar"


def _digit_samples(images, labels, keys, image_size, style="plain"):
    for img, label, key in zip(images, labels, keys):
        caption = f"a handwritten digit {int(label)}"
        meta = {"label": int(label), "caption": caption, "width": image_size,
                "height": image_size, "key": key, "status": "success"}
        yield {"__key__": key, "png": _png(img, image_size, style), "txt": caption.encode("utf-8"),
               "json": json.dumps(meta).encode("utf-8")}


def write_digits(out_dir, image_size: int = 16, shard_size: int = 256, val_fraction: float = 0.1,
                 seed: int = 0, progress: bool = True, style: str = "plain") -> dict:
    """Write the digits as webdataset shards under ``out_dir``, drawn in ``style`` (a key of :data:`STYLES`);
    returns the shard specs.

    Returns ``{"train": "OUT/train/{00000..0000N}.tar", "val": ..., "num_train": int,
    "num_val": int}``; the specs are brace patterns that :class:`ShardLoader` accepts.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if style not in STYLES:
        raise ValueError(f"unknown digits style {style!r}: expected one of {', '.join(STYLES)}")
    images, labels, num_val = digit_arrays(val_fraction, seed)
    keys = [f"{i:09d}" for i in range(len(labels))]
    out = Path(out_dir)
    with tqdm(total=len(labels), desc="digits", unit="img", disable=not progress) as bar:
        val = write_shards(out / "val", _digit_samples(images[:num_val], labels[:num_val], keys[:num_val], image_size,
                                                       style), shard_size, bar) if num_val else ""
        train = write_shards(out / "train", _digit_samples(images[num_val:], labels[num_val:], keys[num_val:],
                                                           image_size, style), shard_size, bar)
    return {"train": train, "val": val, "num_train": len(labels) - num_val, "num_val": num_val}
