"""A tiny real video data set in the video2dataset shard layout: moving scikit-learn digits.

Each clip is one of scikit-learn's 1,797 8x8 handwritten digits, scaled to 0..255 and up-sampled
(bicubic) to ``size // 2`` px, moving in a straight line over a black ``size`` x ``size`` frame
and bouncing off the borders. The digit, the direction (one of 8 compass directions), the speed
(``size/32`` to ``size/16`` px per frame) and the start position come from a numpy generator
seeded by ``(seed, key)``, so a clip does not depend on the split sizes around it. The digit
starts in the quarter of the free range it moves away from, so the first ~6 frames move in the
captioned direction before any bounce. Clips are H.264 mp4 (libx264, yuv420p, crf 10; mpeg4 where
libx264 is missing) with the members video2dataset writes::

    out/train/00000.tar   000000032.mp4  000000032.txt  000000032.json  000000033.mp4 ...
    out/val/00000.tar     000000000.mp4  ...

``KEY.txt`` is the caption ("the digit 3 moving left"); ``KEY.json`` is ``{"key", "caption",
"status": "success", "url", "duration", "fps", "frames", "width", "height", "label",
"direction"}``. Keys are 9-digit, zero padded and unique across both splits (val first, as in
:mod:`difftrain.data.demo`). The tars are byte-for-byte reproducible on one machine and FFmpeg
build (fixed mtime; single-threaded, bit-exact encoding, x264 without its SIMD paths).
"""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from difftrain.data.demo import write_shards

DIRECTIONS = {  # name -> unit (dx, dy) in image coordinates (y grows downwards)
    "right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0),
    "down-right": (0.5 ** 0.5, 0.5 ** 0.5), "down-left": (-(0.5 ** 0.5), 0.5 ** 0.5),
    "up-right": (0.5 ** 0.5, -(0.5 ** 0.5)), "up-left": (-(0.5 ** 0.5), -(0.5 ** 0.5)),
}


@functools.lru_cache(maxsize=1)
def video_codec() -> str:
    """The mp4 encoder used: "libx264" when this PyAV build has it, else "mpeg4"."""
    import av

    try:
        av.Codec("libx264", "w")
        return "libx264"
    except Exception:  # av.codec.codec.UnknownCodecError; its import path moves between releases
        return "mpeg4"


def encode_video(frames: np.ndarray, fps: int, container: str = "mp4") -> bytes:
    """uint8 ``[T, H, W]`` (gray) or ``[T, H, W, 3]`` (RGB) frames -> encoded video bytes.

    H and W must be even (yuv420p). ``container`` is an ffmpeg muxer name ("mp4", "matroska").
    """
    import av

    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError(f"video frames must have even height and width, got {h}x{w}")
    fmt = "gray" if frames.ndim == 3 else "rgb24"
    codec = video_codec()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1  # deterministic, and the data loader workers share the cores
        if codec == "libx264":
            # asm=0: x264's SIMD paths gave ~1 in 1,000 encodes differing bytes from the same
            # input (uninitialized reads, we think); plain C is deterministic and fast enough here
            stream.options = {"crf": "10", "preset": "veryfast", "x264-params": "asm=0"}
        else:
            stream.bit_rate = 8 * h * w * fps  # 8 bits per pixel per frame: near lossless
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=fmt)
            frame = frame.reformat(format="yuv420p", threads=1)  # single-threaded swscale
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush the encoder's look-ahead
    return buf.getvalue()


def _digit_image(pixels: np.ndarray, d: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(pixels).resize((d, d), Image.BICUBIC)
    return np.asarray(img)


def _clip(digit: np.ndarray, rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, str]:
    """Render ``frames`` uint8 ``[size, size]`` frames of ``digit`` bouncing; returns (clip, direction)."""
    d = digit.shape[0]
    free = size - d  # top-left corner positions 0..free along each axis
    name = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    v = np.array(DIRECTIONS[name]) * rng.uniform(size / 32, size / 16)  # (dx, dy) px/frame
    # start in the quarter of the range the digit moves away from (anywhere along a still axis)
    pos = np.array([rng.uniform(0, free / 4) if c > 0 else free - rng.uniform(0, free / 4) if c < 0
                    else rng.uniform(0, free) for c in v])
    clip = np.zeros((frames, size, size), dtype=np.uint8)
    for i in range(frames):
        x, y = np.round(pos).astype(int)
        clip[i, y:y + d, x:x + d] = digit
        pos = pos + v
        for a in range(2):  # reflect off the borders
            if pos[a] < 0:
                pos[a], v[a] = -pos[a], -v[a]
            elif pos[a] > free:
                pos[a], v[a] = 2 * free - pos[a], -v[a]
    return clip, name


def _clip_samples(name: str, keys: list[str], digits, frames: int, size: int, fps: int, seed: int):
    d = max(8, size // 2)
    for key in keys:
        rng = np.random.default_rng([seed, int(key)])
        i = int(rng.integers(len(digits.target)))
        label = int(digits.target[i])
        pixels = np.round(digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        clip, direction = _clip(_digit_image(pixels, d), rng, frames, size)
        caption = f"the digit {label} moving {direction}"
        meta = {"key": key, "caption": caption, "status": "success",
                "url": f"synthetic://moving_digits/{name}/{key}.mp4",
                "duration": frames / fps, "fps": fps, "frames": frames, "width": size,
                "height": size, "label": label, "direction": direction}
        yield {"__key__": key, "mp4": encode_video(clip, fps), "txt": caption.encode("utf-8"),
               "json": json.dumps(meta).encode("utf-8")}


def write_moving_digits(out_dir, n_train: int = 256, n_val: int = 32, shard_size: int = 64,
                        frames: int = 16, size: int = 32, fps: int = 8, seed: int = 0,
                        progress: bool = True) -> dict:
    """Write moving-digit clips as webdataset shards under ``out_dir``; returns the shard specs.

    Returns ``{"train": "OUT/train/{00000..0000N}.tar", "val": ... ("" when n_val == 0),
    "num_train": int, "num_val": int, "codec": str}``, like
    :func:`difftrain.data.demo.write_digits`; the specs are brace patterns.
    """
    from sklearn.datasets import load_digits

    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if n_train <= 0 or n_val < 0:
        raise ValueError(f"need n_train > 0 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    if frames <= 0 or fps <= 0:
        raise ValueError(f"frames and fps must be > 0, got frames={frames}, fps={fps}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and >= 16, got {size}")
    digits = load_digits()
    keys = [f"{i:09d}" for i in range(n_val + n_train)]
    out = Path(out_dir)
    args = (digits, frames, size, fps, seed)
    with tqdm(total=len(keys), desc="moving digits", unit="clip", disable=not progress) as bar:
        val = write_shards(out / "val", _clip_samples("val", keys[:n_val], *args), shard_size, bar) if n_val else ""
        train = write_shards(out / "train", _clip_samples("train", keys[n_val:], *args), shard_size, bar)
    return {"train": train, "val": val, "num_train": n_train, "num_val": n_val, "codec": video_codec()}
