"""PIL image -> training tensor: any mode to RGB (or L), resize to cover, center or random crop,
optional horizontal flip; and aspect-ratio buckets for multi-resolution training.

Images stay **uint8** until they reach the training device (:func:`to_unit` there): a float32 batch
is 4x the bytes, and moving it out of a loader worker cost ~40% of the decode time (new shared
memory pages per batch; ``benchmarks/data_throughput.py``).

Randomness (crop offset, flip) comes from the caller's ``rand(name) -> float in [0, 1)``, which the
loader keys on the sample, so a resumed run crops every sample as the uninterrupted run did.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

_WHITE = (255, 255, 255)


def to_mode(img, channels: int):
    """Any PIL mode (1, L, LA, P, PA, RGBA, CMYK, YCbCr, I;16, I, F, ...) -> RGB (channels=3) or L.

    Transparency is composited onto white (the usual look of a transparent web image); 16- and
    32-bit gray is rescaled to 8 bits by its nominal range, not clipped."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if img.mode == mode:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert(mode)


def parse_buckets(buckets: Sequence, image_size: int) -> list[tuple[int, int]]:
    """``data.buckets`` ([[h, w], ...]; empty = one square bucket) -> list of (h, w)."""
    if not buckets:
        return [(image_size, image_size)]
    out = []
    for b in buckets:
        if (not isinstance(b, (list, tuple)) or len(b) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b)):
            raise ValueError(f"config key 'data.buckets': each bucket must be [height, width] in pixels, got {b!r}")
        out.append((int(b[0]), int(b[1])))
    return out


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> int:
    """The bucket whose aspect ratio is closest to the image's (in log space)."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - r))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 [-1, 1] (float input is already there and passes through)."""
    if x.dtype != torch.uint8:
        return x
    from torchvision.transforms.v2 import functional as TF

    return TF.to_dtype(x, torch.float32, scale=True) * 2.0 - 1.0


class ImageTransform:
    """``(img, bucket, rand) -> uint8 [C, h, w]`` for bucket ``(h, w)``, laid out channels-innermost as PIL
    decodes (strides ``(1, w C, C)``): the loader stacks a batch channels-last without transposing it,
    which cost ~220 us a 256 px sample (``benchmarks/data_throughput.py``)."""

    def __init__(self, channels: int, crop: str = "center", flip: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"config key 'data.channels' must be 1 or 3, got {channels}")
        if crop not in ("center", "random"):
            raise ValueError(f"config key 'data.crop' must be center or random, got {crop!r}")
        self.channels, self.crop, self.flip = channels, crop, flip

    def __call__(self, img, bucket: tuple[int, int], rand: Callable[[str], float]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        img = to_mode(img, self.channels)
        th, tw = bucket
        x = TF.pil_to_tensor(img)  # uint8 [C, h, w]
        h, w = x.shape[-2:]
        if (h, w) != (th, tw):
            s = max(th / h, tw / w)  # cover the bucket, then crop
            rh, rw = max(th, round(h * s)), max(tw, round(w * s))
            if (rh, rw) != (h, w):
                x = TF.resize(x, [rh, rw], antialias=True)
            if self.crop == "random":
                top, left = int(rand("crop_y") * (rh - th + 1)), int(rand("crop_x") * (rw - tw + 1))
            else:
                top, left = (rh - th) // 2, (rw - tw) // 2
            x = x[:, top:top + th, left:left + tw]
        if self.flip and rand("flip") < 0.5:
            x = x.permute(1, 2, 0).flip(1).permute(2, 0, 1)  # keeps PIL's channels-innermost layout
        return x  # a view when cropped: collate's stack copies it once, channels last
