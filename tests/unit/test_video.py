"""Video: the moving-digits shards (real mp4s) and decode_video's clip selection and skip reasons."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from braceexpand import braceexpand

av = pytest.importorskip("av")

from difftrain.data import video  # noqa: E402
from difftrain.data.decode import SkipSample  # noqa: E402
from difftrain.data.moving_digits import DIRECTIONS, encode_video, write_moving_digits  # noqa: E402
from difftrain.data.video import decode_video  # noqa: E402

T, S, FPS = 16, 32, 8  # frames per clip, frame size, frame rate as written
FIELDS = {"key", "caption", "status", "url", "duration", "fps", "frames", "width", "height",
          "label", "direction"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("moving_digits")
    spec = write_moving_digits(out, n_train=6, n_val=2, shard_size=4, frames=T, size=S, fps=FPS,
                               seed=0, progress=False)
    samples = [s for split in ("val", "train") for url in shards(spec[split])
               for s in wds.WebDataset(url, shardshuffle=False)]
    return spec, samples


def shards(spec: str) -> list[str]:
    return list(braceexpand(spec))


def full(sample) -> torch.Tensor:
    return decode_video(sample["mp4"], T, S, u=0.0)  # every frame: [T, 3, S, S]


def centroid(frame: torch.Tensor) -> torch.Tensor:
    """(x, y) brightness centroid of a [C, H, W] frame in [-1, 1] (background -1)."""
    m = (frame.mean(0) + 1.0).clamp(min=0)  # [H, W]
    ys, xs = torch.meshgrid(torch.arange(m.shape[0], dtype=m.dtype),
                            torch.arange(m.shape[1], dtype=m.dtype), indexing="ij")
    return torch.stack([(m * xs).sum(), (m * ys).sum()]) / m.sum()


def test_shard_layout(clips, tmp_path):
    spec, samples = clips
    assert spec["num_train"] == 6 and spec["num_val"] == 2 and spec["codec"] in ("libx264", "mpeg4")
    assert spec["train"].endswith("/train/{00000..00001}.tar")
    assert spec["val"].endswith("/val/{00000..00000}.tar")
    with tarfile.open(shards(spec["train"])[0]) as tar:
        names = tar.getnames()
    keys = sorted({n.split(".", 1)[0] for n in names})
    assert keys == ["000000002", "000000003", "000000004", "000000005"]  # val has 0 and 1
    assert sorted(names) == sorted(f"{k}.{ext}" for k in keys for ext in ("mp4", "txt", "json"))

    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(8)]
    for s in samples:
        assert {k for k in s if not k.startswith("__")} == {"mp4", "txt", "json"}
        meta = json.loads(s["json"])
        assert set(meta) == FIELDS
        assert meta["key"] == s["__key__"] and meta["status"] == "success"
        assert meta["caption"] == s["txt"].decode() == f"the digit {meta['label']} moving {meta['direction']}"
        assert meta["direction"] in DIRECTIONS and 0 <= meta["label"] <= 9
        assert (meta["frames"], meta["fps"], meta["width"], meta["height"]) == (T, FPS, S, S)
        assert meta["duration"] == pytest.approx(T / FPS)
        assert s["mp4"][4:8] == b"ftyp"  # an mp4 container

    again = write_moving_digits(tmp_path, n_train=6, n_val=2, shard_size=4, frames=T, size=S,
                                fps=FPS, seed=0, progress=False)
    for split in ("train", "val"):  # byte-for-byte reproducible
        for a, b in zip(shards(spec[split]), shards(again[split])):
            assert Path(a).read_bytes() == Path(b).read_bytes()


def test_decode_shape_range_and_motion(clips):
    _, samples = clips
    for s in samples:
        x = full(s)
        assert x.shape == (T, 3, S, S) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.max() > 0.5 and x[:, :, 0, 0].max() < -0.9  # a bright digit on black
        # the digit starts away from the border it heads for: no bounce in the first 6 frames
        assert (x[1:6] - x[:5]).abs().amax(dim=(1, 2, 3)).min() > 0.2  # every one of them moves
        shift = centroid(x[3]) - centroid(x[0])  # (dx, dy) over 3 frames, 1-2 px per frame
        for axis, want in enumerate(DIRECTIONS[json.loads(s["json"])["direction"]]):
            if want == 0:
                assert abs(shift[axis]) < 0.75, (s["__key__"], shift)
            else:
                assert shift[axis] * np.sign(want) > 1.5, (s["__key__"], shift)


def test_temporal_crop_follows_u(clips):
    _, samples = clips
    mp4, ref = samples[0]["mp4"], full(samples[0])
    a = decode_video(mp4, 4, S, u=0.5)
    assert torch.equal(a, decode_video(mp4, 4, S, u=0.5))  # same u, same clip
    assert torch.equal(a, ref[6:10])  # start floor(0.5 * (16 - 4 + 1)) = 6
    assert torch.equal(decode_video(mp4, 4, S, u=0.0), ref[0:4])
    assert torch.equal(decode_video(mp4, 4, S, u=0.999), ref[12:16])  # the last possible start
    assert not torch.equal(a, decode_video(mp4, 4, S, u=0.0))
    assert torch.equal(decode_video(mp4, 4, S, stride=3, u=0.5), ref[[3, 6, 9, 12]])  # need 10: start 3


def test_fps_picks_frames_by_timestamp(clips):
    _, samples = clips
    mp4, ref = samples[1]["mp4"], full(samples[1])
    for u in (0.0, 0.5):  # 8 fps source at 4 fps = every second frame
        assert torch.equal(decode_video(mp4, 4, S, fps=4, u=u), decode_video(mp4, 4, S, stride=2, u=u))
    assert torch.equal(decode_video(mp4, 4, S, fps=4, u=0.5), ref[[5, 7, 9, 11]])
    assert torch.equal(decode_video(mp4, 4, S, fps=3, u=0.0), ref[[0, 2, 5, 8]])  # floor(i * 8/3)
    assert torch.equal(decode_video(mp4, T, S, fps=8, u=0.0), ref)
    assert torch.equal(decode_video(mp4, 4, S, fps=16, u=0.0), ref[[0, 0, 1, 1]])  # held frames


def test_channels_resize_and_center_crop(clips):
    _, samples = clips
    mp4 = samples[0]["mp4"]
    rgb = decode_video(mp4, 4, 16, u=0.5)
    gray = decode_video(mp4, 4, 16, u=0.5, channels=1)
    assert rgb.shape == (4, 3, 16, 16) and gray.shape == (4, 1, 16, 16)
    assert (gray[:, 0] - rgb[:, 0]).abs().max() <= 2 / 127.5  # a gray clip: luma = any channel

    frames = np.zeros((4, 32, 48), np.uint8)  # 48 wide: the crop drops 8 px each side
    frames[:, :, :6] = 255  # inside the dropped band
    frames[:, 12:20, 20:28] = 255  # a square in the middle
    x = decode_video(encode_video(frames, FPS), 4, 16, u=0.0)  # resize to 16x24, crop 16x16
    assert x.shape == (4, 3, 16, 16)
    assert x[:, :, :, :2].max() < -0.8  # the left bar was cropped away
    assert x[:, :, 7:9, 7:9].min() > 0.8  # the square kept its place


def test_container_without_frame_count(clips):
    """webm / mkv record no frame count: the clip is placed by counting packets instead."""
    _, samples = clips
    frames = np.zeros((T, S, S), np.uint8)
    for i in range(T):
        frames[i, 8:16, i:i + 8] = 255
    mkv, mp4 = encode_video(frames, FPS, container="matroska"), encode_video(frames, FPS)
    with av.open(io.BytesIO(mkv)) as c:
        assert c.streams.video[0].frames == 0
    for kw in ({"u": 0.5}, {"u": 0.999, "fps": 4}):
        assert torch.equal(decode_video(mkv, 4, S, **kw), decode_video(mp4, 4, S, **kw))


def _audio_frame():
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    return frame


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        audio = out.add_stream("aac", rate=16000)
        out.mux(audio.encode(_audio_frame()))
        out.mux(audio.encode(None))
    return buf.getvalue()


def _empty_video_mkv() -> bytes:
    """A matroska file with a video stream that has no frames (and an audio stream)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = S, S, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        out.mux(audio.encode(_audio_frame()))
        out.mux(audio.encode(None))
        out.mux(stream.encode(None))
    return buf.getvalue()


def reason(data: bytes, **kw) -> str:
    with pytest.raises(SkipSample) as e:
        decode_video(data, **{"frames": 4, "size": S, "key": "k7", "shard": "s.tar", **kw})
    assert "k7" in str(e.value) and "s.tar" in str(e.value)
    return e.value.reason


def test_skip_reasons(clips, monkeypatch):
    _, samples = clips
    mp4 = samples[0]["mp4"]
    assert reason(b"") == "video_decode_error"
    assert reason(b"not a video at all " * 20) == "video_decode_error"
    assert reason(mp4[: len(mp4) // 2]) == "video_decode_error"  # the index (moov) is at the end
    assert reason(mp4, frames=T + 1) == "video_too_short"
    assert reason(mp4, frames=9, stride=2) == "video_too_short"  # needs 17 frames
    assert reason(mp4, frames=9, fps=4) == "video_too_short"  # 2 s at 4 fps: 17 source frames
    decode_video(mp4, 8, S, fps=4)  # 8 frames at 4 fps fit
    assert reason(_audio_only_mp4()) == "video_no_frames"
    assert reason(_empty_video_mkv()) == "video_no_frames"
    monkeypatch.setattr(video, "MAX_PIXELS", S * S - 1)
    assert reason(mp4) == "too_large"


def test_bad_arguments(clips):
    mp4 = clips[1][0]["mp4"]
    for kw in ({"u": 1.0}, {"u": -0.1}, {"channels": 2}, {"stride": 0}, {"fps": 0.0}, {"frames": 0}):
        with pytest.raises(ValueError):
            decode_video(mp4, **{"frames": 4, "size": S, **kw})


def test_mpeg4_fallback(tmp_path, monkeypatch):
    """Where PyAV has no libx264 the writer falls back to mpeg4; the clips still decode."""
    from difftrain.data import moving_digits

    monkeypatch.setattr(moving_digits, "video_codec", lambda: "mpeg4")
    spec = write_moving_digits(tmp_path, n_train=2, n_val=0, shard_size=4, frames=8, size=16,
                               fps=FPS, progress=False)
    assert spec["codec"] == "mpeg4" and spec["val"] == ""
    sample = next(iter(wds.WebDataset(shards(spec["train"])[0], shardshuffle=False)))
    with av.open(io.BytesIO(sample["mp4"])) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    x = decode_video(sample["mp4"], 8, 16, u=0.0)
    assert x.shape == (8, 3, 16, 16) and x.max() > 0.5 and x[:, :, 0, 0].max() < -0.8
