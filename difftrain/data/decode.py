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
| mp4, webm, avi, mov, mkv  | allowed; decoded by :mod:`difftrain.data.video`           |
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
VIDEO_EXTS = ("mp4", "webm", "avi", "mov", "mkv")  # decoded by difftrain.data.video, not here
SAFE_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS + VIDEO_EXTS + ("json", "cls", "npy", "safetensors"))
MAX_PIXELS = 1 << 26  # 64 Mpx: beyond any training image; PIL's own bomb check is ~179 Mpx
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # never let PIL guess among all its plugins


class SkipSample(Exception):
    """A sample that must not (or cannot) be used; ``reason`` is the loader's counter name."""

    def __init__(self, message: str, reason: str = "unsafe_member"):
        super().__init__(message)
        self.reason = reason


def open_image(data: bytes, min_size: int = 0, where: str = "?"):
    """Bytes -> fully loaded ``PIL.Image`` (PNG, JPEG, WEBP only); SkipSample ``too_large`` /
    ``too_small`` (checked from the header, before decoding) or ``decode_error``."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)  # reads the header only
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise SkipSample(f"image of {w}x{h} px exceeds MAX_PIXELS={MAX_PIXELS} in {where}", "too_large")
        if min(w, h) < min_size:
            raise SkipSample(f"image of {w}x{h} px is below data.min_image_size={min_size} in {where}", "too_small")
        img.load()  # decode now, so truncated files fail here
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard, for sizes above ~2 x 89 Mpx
        raise SkipSample(f"image too large in {where}: {e}", "too_large") from None
    except Exception as e:  # PIL raises many types on bad bytes
        raise SkipSample(f"undecodable image in {where}: {type(e).__name__}: {e}", "decode_error") from None
    return img


def _safetensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    **{ext: open_image for ext in IMAGE_EXTS},
    **{ext: bytes for ext in VIDEO_EXTS},  # left to difftrain.data.video
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
