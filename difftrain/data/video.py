"""Encoded video bytes (mp4, webm, ...) -> a fixed-length clip tensor, with PyAV.

:func:`decode_video` turns one webdataset member (``KEY.mp4`` as video2dataset writes it) into a
float tensor ``[T, C, size, size]`` in [-1, 1]:

1. **Frame selection.** With ``stride`` the clip is source frames ``s, s+stride, ...`` (decode
   order = presentation order); with ``fps`` it is, for ``i < frames``, the source frame on screen
   at time ``t_s + i/fps`` (the last frame whose timestamp is <= that time), so a clip spans the
   same wall-clock time whatever the source frame rate. Either way the clip covers ``need`` source
   frames (``(frames-1)*stride + 1``, or ``floor((frames-1) * rate / fps) + 1`` for the stream's
   average ``rate``).
2. **Temporal crop.** The start frame is ``s = floor(u * (available - need + 1))``, with ``u`` in
   [0, 1) drawn by the caller (the loader passes a keyed uniform, ``diffusion/keyed.py``), so the
   crop is a function of the sample's bytes and its key only. ``available`` is the container's
   frame count, or the number of video packets where the container does not record it (webm).
3. **Decoding** runs single-threaded (loader workers are the parallelism) from the first frame
   and stops after the last needed one; no seeking.
4. **Spatial transform**, as for square training images: RGB (or L, ITU-R 601 luma, for
   ``channels == 1``), short side resized to ``size`` (antialiased bilinear, one batched call
   for all frames), center crop to a square.

Bad input raises :class:`~difftrain.data.decode.SkipSample`; ``reason`` is the loader's counter:

| reason                 | when                                                             |
| ---------------------- | ---------------------------------------------------------------- |
| ``video_decode_error`` | not a video, a corrupt container or stream (any PyAV error)       |
| ``video_no_frames``    | no video stream, or a video stream with no frames                 |
| ``video_too_short``    | fewer source frames than the clip needs                           |
| ``too_large``          | frame width * height above ``decode.MAX_PIXELS``                  |
"""
from __future__ import annotations

import io
import math

import torch

from difftrain.data.decode import MAX_PIXELS, VIDEO_EXTS, SkipSample  # noqa: F401 (VIDEO_EXTS re-exported)



def clip_span(frames: int, stride: int = 1, fps: float | None = None, rate: float | None = None) -> int:
    """Source frames a clip covers (``need``): ``(frames-1)*stride + 1``, or with ``fps`` for a
    source at ``rate`` frames/s, ``floor((frames-1) * rate / fps) + 1``."""
    if fps is None:
        return (frames - 1) * stride + 1
    return math.floor((frames - 1) * rate / fps + 1e-6) + 1  # 1e-6: 3 * 8 / 4 is exactly 6


def _check_args(frames: int, size: int, stride: int, fps: float | None, u: float, channels: int):
    if frames <= 0 or size <= 0:
        raise ValueError(f"frames and size must be > 0, got frames={frames}, size={size}")
    if stride <= 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _count_frames(data: bytes, index: int) -> int:
    """Video packets of stream ``index``, read without decoding (for containers that don't record
    a frame count). The demuxer's final flush packet has size 0 and is not counted."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for p in container.demux(container.streams.video[index]) if p.size)


def _select(container, stream, start: int, frames: int, stride: int, fps: float | None,
            rate: float | None) -> list:
    """Decode from the first frame and return the clip's ``frames`` frames (av.VideoFrame), or
    fewer if the stream ends first. Stops decoding after the last needed frame."""
    picked: list = []
    if fps is None:
        last = start + (frames - 1) * stride
        for k, frame in enumerate(container.decode(stream)):
            if k >= start and (k - start) % stride == 0:
                picked.append(frame)
            if k >= last:
                break
        return picked
    # fps: target i is shown at t0 + i/fps; it gets the last frame with time <= target (+ a quarter
    # source frame of slack for timestamp rounding), decided when the next frame's time passes it.
    tol = 0.25 / rate
    t0, prev, prev_t = None, None, None
    for k, frame in enumerate(container.decode(stream)):
        t = float(frame.pts * stream.time_base) if frame.pts is not None else k / rate
        if k < start:
            continue
        if t0 is None:
            t0 = t
        while prev is not None and len(picked) < frames and t > t0 + len(picked) / fps + tol:
            picked.append(prev)
        if len(picked) == frames:
            break
        prev, prev_t = frame, t
    # stream ended: the last frame stays on screen for one frame period
    while prev is not None and len(picked) < frames and t0 + len(picked) / fps < prev_t + 1.0 / rate - tol:
        picked.append(prev)
    return picked


def decode_video(data: bytes, frames: int, size: int, stride: int = 1, fps: float | None = None,
                 u: float = 0.5, channels: int = 3, key: str = "?", shard: str = "?") -> torch.Tensor:
    """Encoded video bytes -> float32 clip ``[frames, channels, size, size]`` in [-1, 1].

    ``stride`` takes every stride-th source frame; ``fps`` (overrides ``stride``) samples the
    clip at that frame rate by timestamp. ``u`` in [0, 1) places the temporal crop (module
    docstring). ``key`` and ``shard`` only name the sample in SkipSample messages.
    """
    import av
    from torchvision.transforms.v2 import functional as F

    _check_args(frames, size, stride, fps, u, channels)
    where = f"sample {key} of {shard}"
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise SkipSample(f"no video stream in {where}", reason="video_no_frames")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > MAX_PIXELS:
                raise SkipSample(f"video of {w}x{h} px exceeds MAX_PIXELS={MAX_PIXELS} in {where}",
                                 reason="too_large")
            stream.thread_count = 1  # loader workers are the parallelism
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if fps is not None and not rate:
                raise SkipSample(f"video with unknown frame rate in {where}", reason="video_decode_error")
            rate = float(rate) if rate else None
            available = stream.frames or _count_frames(data, 0)
            if available == 0:
                raise SkipSample(f"video stream without frames in {where}", reason="video_no_frames")
            need = clip_span(frames, stride, fps, rate)
            if available < need:
                raise SkipSample(f"video of {available} frames is shorter than the {need} needed "
                                 f"in {where}", reason="video_too_short")
            start = math.floor(u * (available - need + 1))
            picked = _select(container, stream, start, frames, stride, fps, rate)
            arrays = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in picked]  # [h, w, 3] each
    except av.FFmpegError as e:
        raise SkipSample(f"cannot decode video in {where}: {e}", reason="video_decode_error") from e
    if not arrays and start == 0:
        raise SkipSample(f"video stream without decodable frames in {where}", reason="video_no_frames")
    if len(arrays) < frames:
        raise SkipSample(f"video decoded to {len(arrays)} clip frames, fewer than the {frames} "
                         f"needed in {where}", reason="video_too_short")
    x = torch.stack(arrays).permute(0, 3, 1, 2)  # [T, 3, h, w] uint8
    if channels == 1:
        x = F.rgb_to_grayscale(x)  # [T, 1, h, w], ITU-R 601 luma as PIL's convert("L")
    if x.shape[-2:] != (size, size):
        x = F.center_crop(F.resize(x, size, antialias=True), [size, size])  # [T, C, size, size]
    return F.to_dtype(x, torch.float32, scale=True) * 2.0 - 1.0  # [T, C, size, size] in [-1, 1]
