"""The streaming loader on real tars: layout, exactly-once epochs, exact resume, re-layout, mixing,
resampling, buckets, and every kind of bad input skipped and counted exactly."""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data import tario
from difftrain.data.demo import write_digits
from difftrain.data.images import nearest_bucket, parse_buckets
from difftrain.data.loader import DataError, ShardLoader
from difftrain.data.samples import SampleDecoder
from difftrain.data.spec import parse_spec
from difftrain.data.streams import ShardSequence
from tests.unit.test_data import _Touch, take, write_tar

B = 16  # train split: 270 samples in 9 shards of <= 32


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return write_digits(out, image_size=16, shard_size=32, val_fraction=0.85, seed=0, progress=False)


def loader(spec, batch=B, rank=0, world=1, **kw):
    kw.setdefault("channels", 1)
    kw.setdefault("image_size", 16)
    return ShardLoader(spec, batch, rank, world, **kw)


def ids(batch):
    return list(zip(batch["urls"], batch["keys"]))


def assert_same(a, b):
    assert ids(a) == ids(b) and a["captions"] == b["captions"] and a["position"] == b["position"]
    for k in ("labels", "index", "epochs", "pixels"):
        assert torch.equal(a[k], b[k]), k


def cat(parts):
    out = {k: sum((p[k] for p in parts), []) for k in ("urls", "keys", "captions")}
    out.update({k: torch.cat([p[k] for p in parts]) for k in ("labels", "index", "epochs", "pixels")})
    out["position"] = parts[0]["position"]
    return out


def png(size=(16, 16), mode="L", fmt="PNG", color=128):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def good(i, **extra):
    return {"__key__": f"{i:09d}", "png": png(), "txt": f"digit {i}".encode(),
            "json": json.dumps({"label": i % 10, "punsafe": 0.1}).encode(), **extra}


# ------------------------------------------------------------------------------------ layout
def test_batches_config_and_errors(digits):
    b = take(loader(digits["train"]), 1)[0]
    assert b["pixels"].shape == (B, 1, 16, 16) and b["pixels"].dtype == torch.uint8  # [-1, 1] on the device
    assert b["position"] == {"g": 0} and b["index"].tolist() == list(range(B))
    assert all(c == f"a handwritten digit {l}" for c, l in zip(b["captions"], b["labels"].tolist()))
    cfg = DataConfig(train=digits["train"], batch_size=B, num_workers=0, channels=1, image_size=16)
    assert_same(take(ShardLoader.from_config(cfg, rank=0, world=1, seed=0), 1)[0], b)
    with pytest.raises(ValueError, match="data.batch_size"):
        loader(digits["train"], 10, rank=0, world=4)
    with pytest.raises(ValueError, match="data.streams"):
        loader(digits["train"], 16, streams=3)
    with pytest.raises(ValueError, match="data.train"):
        loader("")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_world_size_independent_for_a_fixed_layout(digits, num_workers):
    kw = dict(num_workers=num_workers, seed=1, streams=2, shuffle_buffer=8, groups=2)
    whole = take(loader(digits["train"], **kw), 12)  # 192 samples: past the 270 / 2 of a stream's epoch
    ranks = [take(loader(digits["train"], rank=r, world=2, **kw), 12) for r in (0, 1)]
    for g in range(12):
        assert len(ranks[0][g]["keys"]) == B // 2
        assert_same(cat([ranks[0][g], ranks[1][g]]), whole[g])


def test_worker_batch_buffers_are_reused_and_never_overwrite_batches_in_use(digits):
    ref = take(loader(digits["train"], channels=3, num_workers=0), 24)
    assert ref[0]["pixels"].is_contiguous(memory_format=torch.channels_last)  # stacked without transposing
    held = take(loader(digits["train"], channels=3, num_workers=1), 24)  # all kept: no buffer is ever free
    for a, b in zip(held, ref):
        assert_same(a, b)
    it, ptrs, kept = iter(loader(digits["train"], channels=3, num_workers=1)), set(), None
    for i in range(24):
        batch = next(it)
        assert_same(batch, ref[i])
        ptrs.add(batch["pixels"].data_ptr())
        if i == 3:  # a view outlives its batch: that buffer stays busy
            kept, want = batch["pixels"][2:5], batch["pixels"][2:5].clone()
        del batch
    assert torch.equal(kept, want)
    assert len(ptrs) <= 6  # prefetch_factor + 4 buffers, reused


def test_every_sample_once_per_epoch_2_ranks_x_2_workers(digits):
    seen = collections.Counter()
    its = [iter(loader(digits["train"], rank=r, world=2, num_workers=2, seed=3, shuffle_buffer=8)) for r in (0, 1)]
    for _ in range(30):  # 480 samples: every stream is past epoch 0
        for it in its:
            b = next(it)
            seen.update(zip(b["epochs"].tolist(), b["urls"], b["keys"]))
    epoch0 = [v for (e, _, _), v in seen.items() if e == 0]
    assert len(epoch0) == digits["num_train"] and set(epoch0) == {1}
    assert max(seen.values()) == 1


def test_epochs_reshuffle_shards(digits):
    b = take(loader(digits["train"], 8, seed=0), 60)  # one stream: shards in epoch order
    order = {0: [], 1: []}
    for batch in b:
        for e, u in zip(batch["epochs"].tolist(), batch["urls"]):
            if e in order and (not order[e] or order[e][-1] != u):
                order[e].append(u)
    assert sorted(order[0]) == sorted(set(tario_urls(digits))) and order[0] != order[1][:len(order[0])]


def tario_urls(digits):
    from braceexpand import braceexpand

    return list(braceexpand(digits["train"]))


# ------------------------------------------------------------------------------------ resume
def test_resume_is_exact_with_buffer_mixing_and_workers(digits):
    spec = [{"shards": digits["train"], "weight": 3}, {"shards": digits["val"], "weight": 1}]
    kw = dict(seed=2, shuffle_buffer=10, streams=2, groups=2)
    ref = take(loader(spec, **kw), 14)
    first = loader(spec, num_workers=2, **kw)  # prefetches ahead: state is what was handed out
    got = take(first, 9)
    for a, b in zip(got, ref):
        assert_same(a, b)
    sd = json.loads(json.dumps(first.state_dict(7)))  # the trainer saves before its look-ahead batch
    assert sd["g"] == 7 and sd["layout"] == [2, 2]
    again = loader(spec, num_workers=1, **kw)  # 1 worker divides K = 2: exact
    again.load_state_dict(sd)
    for a, b in zip(take(again, 7), ref[7:]):
        assert_same(a, b)
    ranks = []
    for r in (0, 1):  # the same state on 2 ranks (streams = 2): exact too
        ld = loader(spec, rank=r, world=2, **kw)
        ld.load_state_dict(sd)
        ranks.append(take(ld, 3))
    for g in range(3):
        assert_same(cat([ranks[0][g], ranks[1][g]]), ref[7 + g])


def test_resume_reads_at_most_one_partial_shard_per_stream(digits, monkeypatch):
    kw = dict(seed=4, streams=2)
    first = loader(digits["train"], **kw)
    take(first, 5)
    sd = first.state_dict()
    opened = []
    real = tario.read_shard

    def spy(url, start_index=0, start_offset=0):
        opened.append((url, start_index, start_offset))
        return real(url, start_index, start_offset)

    monkeypatch.setattr(tario, "read_shard", spy)
    again = loader(digits["train"], **kw)
    again.load_state_dict(sd)
    take(again, 1)
    partial = [o for o in opened if o[1] > 0]
    assert len(partial) <= 2 and all(o[2] > 0 for o in partial)  # seeks: nothing before is read


def test_relayout_continues_the_epoch_without_repeats(digits):
    kw = dict(seed=5, shuffle_buffer=6)
    first = loader(digits["train"], num_workers=0, streams=1, **kw)  # 1 x 1 streams
    before = take(first, 5)
    sd = first.state_dict()
    seen = collections.Counter(k for b in before for k in zip(b["epochs"].tolist(), b["urls"], b["keys"]))
    its = []
    for r in (0, 1):  # 2 ranks x 2 workers cannot keep 1 x 1 streams: re-layout to 2 x 2
        ld = loader(digits["train"], rank=r, world=2, num_workers=2, **kw)
        ld.load_state_dict(sd)
        assert (ld.K, ld.P) == (2, 2)
        its.append(iter(ld))
    for _ in range(40):  # stream 0 has the old shard in progress + 2 more of epoch 0: ~100 samples
        for it in its:
            b = next(it)
            seen.update(zip(b["epochs"].tolist(), b["urls"], b["keys"]))
    epoch0 = [v for (e, _, _), v in seen.items() if e == 0]
    assert len(epoch0) == digits["num_train"] and set(epoch0) == {1}


def test_state_from_another_spec_is_refused(digits):
    sd = loader(digits["train"]).state_dict()
    with pytest.raises(ValueError, match="same shard spec"):
        loader(digits["val"]).load_state_dict(sd)


# ------------------------------------------------------------------------------ modes, mixing
def test_resampled_and_mixing_weights(digits, tmp_path):
    a = write_tar(tmp_path / "a.tar", [dict(good(i), txt=b"A") for i in range(40)])
    b = write_tar(tmp_path / "b.tar", [dict(good(i), txt=b"B") for i in range(40)])
    spec = [{"shards": a, "weight": 3}, {"shards": b, "weight": 1, "name": "b"}]
    caps = [c for batch in take(loader(spec, 16, seed=0, resampled=True), 40) for c in batch["captions"]]
    frac = caps.count("A") / len(caps)
    assert 0.70 < frac < 0.80  # 640 draws of p = 0.75: 4 sigma is 0.07
    urls = [u for batch in take(loader(digits["train"], 16, resampled=True, seed=1), 20) for u in batch["urls"]]
    assert len(set(urls)) > 1
    with pytest.raises(ValueError, match=r"data.train\[0\].weight"):
        loader([{"shards": a, "weight": -1}])


def test_pipe_urls_and_dotted_keys(tmp_path):
    samples = [{"__key__": f"img.v2.{i:04d}", "png": png(), "seg.png": png(), "txt": f"c{i}".encode()}
               for i in range(8)]
    path = write_tar(tmp_path / "dots.tar", samples)
    raws = [r for r, _ in tario.read_shard(path)]
    assert [r["__key__"] for r in raws] == [s["__key__"] for s in samples]
    assert all(set(r) - {"__key__", "__url__", "__index__", "__offset__"} == {"png", "seg.png", "txt"} for r in raws)
    b = take(loader(f"pipe:cat {path}", 8), 1)[0]
    assert b["keys"] == [s["__key__"] for s in samples] and b["captions"][3] == "c3"


def test_aspect_ratio_buckets(tmp_path):
    sizes = [(40, 20), (20, 40), (30, 30), (44, 20), (20, 42), (31, 30), (50, 24), (22, 40)] * 3
    samples = [dict(good(i), png=png(s, "RGB")) for i, s in enumerate(sizes)]
    spec = write_tar(tmp_path / "ar.tar", samples)
    buckets = parse_buckets([[8, 16], [16, 8], [12, 12]], 0)
    assert nearest_bucket(buckets, 40, 20) == 0 and nearest_bucket(buckets, 20, 40) == 1
    dec = SampleDecoder(channels=3, buckets=buckets, crop="random", flip=True)
    batches = take(ShardLoader(spec, 4, decoder=dec), 5)
    shapes = [tuple(b["pixels"].shape[-2:]) for b in batches]
    assert set(shapes) <= {(8, 16), (16, 8), (12, 12)} and len(set(shapes)) == 3
    # the pools are part of the state: resume is exact with buckets too
    ref = take(ShardLoader(spec, 4, decoder=dec), 8)
    first = ShardLoader(spec, 4, decoder=dec)
    take(first, 3)
    again = ShardLoader(spec, 4, decoder=dec)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(take(again, 5), ref[3:]):
        assert_same(a, b)
    with pytest.raises(ValueError, match="data.buckets"):
        ShardLoader(spec, 4, decoder=dec, streams=2)


def test_image_modes_to_rgb(tmp_path):
    from difftrain.data.images import ImageTransform

    tf = ImageTransform(3)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> white
    assert tf(rgba, (8, 8), None).min() == 255
    i16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert tf(i16, (8, 8), None).min() == 255
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"):
        x = tf(Image.new(mode, (12, 9)), (8, 8), None)
        assert x.shape == (3, 8, 8), mode
    p = Image.new("P", (8, 8))
    p.info["transparency"] = 0
    assert tf(p, (8, 8), None).min() == 255


# ------------------------------------------------------------------------------- bad input
def big_png_header(w, h):
    """A PNG whose header claims w x h (checked before any pixel is decoded)."""
    data = bytearray(png((4, 4)))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


BAD = {  # reason -> samples that must be skipped with it
    "decode_error": [dict(good(100), png=b"\x89PNG\r\n\x1a\n garbage"),
                     dict(good(101), jpg=png(fmt="JPEG")[:200], png=None)],
    "empty_member": [dict(good(102), txt=b"")],
    "missing_caption": [dict(good(103), txt=None, json=b'{"label": 3}'), dict(good(104), txt=b"   ")],
    "too_small": [dict(good(105), png=png((1, 1)))],
    "too_large": [dict(good(106), png=big_png_header(30000, 30000))],
    "bad_json": [dict(good(107), json=b"{not json")],
    "unsafe_member": [dict(good(108), pkl=None), dict(good(109), pth=b"PK\x03\x04")],
    "missing_media": [{"__key__": "000000110", "txt": b"no image"}],
    "filtered:punsafe": [dict(good(111), json=json.dumps({"punsafe": 0.9}).encode())],
}


def test_every_kind_of_bad_input_is_skipped_and_counted(tmp_path):
    marker = tmp_path / "pwned"
    samples = []
    for items in BAD.values():
        for s in items:
            s = {k: v for k, v in s.items() if v is not None}
            if s["__key__"] == "000000108":
                s["pkl"] = pickle.dumps(_Touch(marker))
            samples.append(s)
    goods = [good(i) for i in range(30)]
    write_tar(tmp_path / "00000.tar", goods[:10] + samples[:6])
    write_tar(tmp_path / "00001.tar", goods[10:20] + samples[6:])
    full = write_tar(tmp_path / "00002.tar", goods[20:30])
    data = open(full, "rb").read()
    s25 = [r for r, _ in tario.read_shard(full)][5]["__offset__"]
    (tmp_path / "00002.tar").write_bytes(data[:s25 + 3 * 512 + 100])  # inside sample 25: 20..24 survive
    spec = str(tmp_path / "{00000..00003}.tar")
    dec = SampleDecoder(channels=1, buckets=[(16, 16)], min_image_size=4, require_caption=True,
                        filters={"punsafe": "<0.5"})
    write_tar(tmp_path / "00003.tar", goods[:1])
    ld = ShardLoader(spec, 5, decoder=dec, max_skip_rate=0.9)
    (tmp_path / "00003.tar").unlink()  # a shard that disappears after the start is skipped and counted
    batches = take(ld, 6)  # 25 good samples in epoch 0, then 5 from the first shard of epoch 1
    keys = [k for b in batches[:5] for k in b["keys"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(25)] and set(batches[5]["epochs"].tolist()) == {1}
    want = {r: len(v) for r, v in BAD.items()}
    # the missing shard is met again when epoch 1 starts with it (its good samples come first otherwise)
    want.update(shard_truncated=1, shard_unreadable=1 + (ShardSequence(parse_spec(spec)[0], 0, 0, False).at(4)[0]
                                                         == str(tmp_path / "00003.tar")))
    assert ld.skipped == want
    assert ld.counts()["good"] == 30
    assert not marker.exists()


def test_mostly_broken_data_stops_with_a_clear_error(tmp_path):
    samples = [dict(good(i), png=b"broken") if i % 4 else good(i) for i in range(400)]
    spec = write_tar(tmp_path / "broken.tar", samples)
    with pytest.raises(DataError, match=r"data.max_skip_rate=0.5 exceeded on rank 0: .*decode_error="):
        take(loader(spec, 10), 40)


def test_video_batches_and_broken_clips(tmp_path):
    pytest.importorskip("av")
    from difftrain.data.moving_digits import write_moving_digits

    spec = write_moving_digits(tmp_path / "clips", n_train=6, n_val=0, shard_size=6, frames=8, size=16,
                               progress=False)["train"]
    raws = [r for r, _ in tario.read_shard(spec.replace("{00000..00000}", "00000"))]
    short = write_moving_digits(tmp_path / "short", n_train=1, n_val=0, frames=3, size=16, progress=False)["train"]
    bad = [dict(raws[0], __key__="000000100", mp4=b"not a video"),
           dict([r for r, _ in tario.read_shard(short.replace("{00000..00000}", "00000"))][0], __key__="000000101")]
    clean = [{k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"} for r in raws + bad]
    path = write_tar(tmp_path / "mixed.tar", clean[:3] + clean[6:] + clean[3:6])
    dec = SampleDecoder("video", channels=1, buckets=[(16, 16)], frames=4, frame_stride=2)
    ld = ShardLoader(path, 3, decoder=dec)
    batches = take(ld, 2)
    assert batches[0]["pixels"].shape == (3, 4, 1, 16, 16) and batches[0]["pixels"].dtype == torch.float32
    assert sorted(k for b in batches for k in b["keys"]) == sorted(r["__key__"] for r in raws)
    assert ld.skipped == {"video_decode_error": 1, "video_too_short": 1}


def test_skip_budget_rules():
    """data.max_skip_rate: samples after MIN_SEEN (filtered:* aside), shards after MIN_SHARDS opened; a failed
    shard is not a broken sample."""
    from difftrain.data.loader import MIN_SEEN, MIN_SHARDS, over_budget

    assert (MIN_SEEN, MIN_SHARDS) == (200, 16)
    assert over_budget({"decode_error": 100}, 99, 0, 0.5) is None
    assert over_budget({"decode_error": 101}, 99, 0, 0.5) == "101 of 200 samples read were broken"
    assert over_budget({"decode_error": 100, "filtered:punsafe": 500}, 100, 0, 0.5) is None
    assert over_budget({"shard_unreadable": 300}, 0, 0, 0.5) is None
    assert over_budget({"shard_unreadable": 9}, 0, 15, 0.5) is None
    assert over_budget({"shard_unreadable": 8}, 0, 16, 0.5) is None
    assert over_budget({"shard_unreadable": 5, "shard_truncated": 4}, 0, 16, 0.5) == "9 of 16 shards opened failed"
    assert over_budget({"shard_truncated": 16}, 0, 16, 1.0) is None  # data stat: never


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_saved_position_whose_shard_vanished_is_one_line(tmp_path, num_workers):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [good(10 * i + j) for j in range(10)])
    spec = str(tmp_path / "{00000..00002}.tar")
    first = loader(spec, 4, shuffle_buffer=8)
    take(first, 2)
    sd = first.state_dict()
    again = loader(spec, 4, shuffle_buffer=8, num_workers=num_workers)
    for p in tmp_path.glob("*.tar"):  # gone between the start and the first read
        p.unlink()
    again.load_state_dict(sd)
    with pytest.raises(DataError, match=r"^data.train on rank 0( \(loader worker 0\))?: cannot open shard "
                                        r"\S+/0000\d.tar: \[Errno 2\] No such file or directory: '\S+'$"):
        take(again, 1)
