"""Whitelisted decoding of webdataset sample members, and image -> tensor.

webdataset's default decoders unpickle ``.pkl`` / ``.pth`` members; a shard downloaded from the
internet is untrusted, so we never use them. :func:`decode_member` decodes by extension from a
fixed whitelist and raises :class:`SkipSample` for anything else; :func:`decode_sample` checks
*every* member of a sample against the whitelist before decoding any of them, so a sample with a
pickle inside is skipped whole and its bytes are never interpreted.

| extension                 | decoded to                                              |
| ------------------------- | ------------------------------------------------------- |
| png, jpg, jpeg, webp      | ``PIL.Image`` (fully loaded; pixel-count bomb guard)     |
| txt                       | ``str`` (utf-8)                                          |
| json                      | parsed JSON                                              |
| cls                       | ``int``                                                  |
| npy                       | ``np.ndarray`` via ``np.load(allow_pickle=False)``        |
| safetensors               | ``dict[str, torch.Tensor]``                              |
| anything else (pkl, ...)  | ``SkipSample`` (the loader counts it)                     |

A member name such as ``seg.png`` (webdataset splits a file name at its *first* dot) is
dispatched on its last component, ``png``.
"""
from __future__ import annotations

import io
import json
from typing import Any, Callable

import numpy as np
import torch

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTS = ("txt",)
SAFE_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS + ("json", "cls", "npy", "safetensors"))
MAX_PIXELS = 1 << 26  # 64 Mpx: beyond any training image; PIL's own bomb check is ~179 Mpx
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # never let PIL guess among all its plugins


class SkipSample(Exception):
    """A sample that must not (or cannot) be used; ``reason`` is the loader's counter name."""

    def __init__(self, message: str, reason: str = "unsafe_member"):
        super().__init__(message)
        self.reason = reason


def _image(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)  # reads the header only
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise SkipSample(f"image of {w}x{h} px exceeds MAX_PIXELS={MAX_PIXELS}", reason="too_large")
    img.load()  # decode now, so truncated files fail here
    return img


def _safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    **{ext: _image for ext in IMAGE_EXTS},
    "txt": lambda b: b.decode("utf-8"),
    "json": lambda b: json.loads(b.decode("utf-8")),
    "cls": lambda b: int(b.decode("utf-8").strip()),
    "npy": lambda b: np.load(io.BytesIO(b), allow_pickle=False),
    "safetensors": _safetensors,
}


def member_type(name: str) -> str:
    """The extension a member is decoded by: the last dot-component, lower case."""
    return name.rsplit(".", 1)[-1].lower()


def decode_member(name: str, data: bytes, key: str = "?", shard: str = "?") -> Any:
    """Decode one member's bytes by its extension; raises SkipSample for non-whitelisted ones."""
    ext = member_type(name)
    if ext not in SAFE_EXTS:
        raise SkipSample(f"unsafe or unknown member '{name}' in sample {key} of {shard}")
    return _DECODERS[ext](data)


def check_members(sample: dict, shard: str = "?") -> None:
    """Raise SkipSample if any member of a raw sample is outside the whitelist."""
    key = sample.get("__key__", "?")
    for name in sample:
        if not name.startswith("__") and member_type(name) not in SAFE_EXTS:
            raise SkipSample(f"unsafe or unknown member '{name}' in sample {key} of {shard}")


def decode_sample(sample: dict, only: tuple[str, ...] | None = None) -> dict:
    """Decode a raw webdataset sample (``{"__key__", "__url__", ext: bytes}``).

    Every member is checked against the whitelist first; then the members named in ``only``
    (all when None) are decoded. ``__``-prefixed metadata is passed through.
    """
    shard = sample.get("__url__", "?")
    key = sample.get("__key__", "?")
    check_members(sample, shard)
    out = {}
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
        elif only is None or name in only:
            out[name] = decode_member(name, value, key, shard)
    return out


def image_transform(channels: int, image_size: int) -> Callable[[Any], torch.Tensor]:
    """PIL image -> float tensor [C, H, W] in [-1, 1]: convert mode, resize the short side to
    ``image_size`` (antialiased bilinear), center-crop to a square."""
    from torchvision.transforms import v2

    if channels not in (1, 3):
        raise ValueError(f"config key 'data.channels' must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    tf = v2.Compose([
        v2.ToImage(),  # uint8 [C, h, w]
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),  # [0, 1]
    ])

    def apply(img) -> torch.Tensor:
        if img.mode != mode:
            img = img.convert(mode)
        if img.size == (image_size, image_size):  # already the target size: skip resize and crop
            x = v2.functional.to_dtype(v2.functional.pil_to_tensor(img), torch.float32, scale=True)
        else:
            x = tf(img)
        return x * 2.0 - 1.0  # [C, H, W] in [-1, 1]

    return apply
