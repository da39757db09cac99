"""Data: the digits shards, the whitelist decoder and the exact streaming loader, on real tars."""
from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from difftrain.data.decode import SkipSample, decode_member, decode_sample, image_transform
from difftrain.data.demo import write_digits
from difftrain.data.loader import ShardLoader, expand_spec

B = 64  # train split: 270 samples in 9 shards of <= 32 -> 4 global batches per epoch


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return write_digits(out, image_size=16, shard_size=32, val_fraction=0.85, seed=0, progress=False)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
    assert a["position"] == b["position"]
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["index"], b["index"])
    assert torch.equal(a["pixels"], b["pixels"])


def cat(parts):
    return {"keys": sum((p["keys"] for p in parts), []),
            "captions": sum((p["captions"] for p in parts), []),
            "position": parts[0]["position"],
            **{k: torch.cat([p[k] for p in parts]) for k in ("labels", "index", "pixels")}}


def png_bytes(size=16, mode="L"):
    buf = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def good(i):
    return {"__key__": f"{i:09d}", "png": png_bytes(), "txt": f"s{i}".encode(),
            "json": json.dumps({"label": i % 10}).encode()}


# ---------------------------------------------------------------------------------------- demo
def test_write_digits_layout(digits):
    assert digits["num_train"] == 270 and digits["num_val"] == 1527
    train, val = expand_spec(digits["train"]), expand_spec(digits["val"])
    assert len(train) == 9 and len(val) == 48 and train[0].endswith("train/00000.tar")
    keys = []
    for shard in train + val:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            stems = sorted({n.split(".")[0] for n in names})
            assert sorted(names) == sorted(f"{k}.{e}" for k in stems for e in ("png", "txt", "json"))
            keys += stems
            meta = json.load(tar.extractfile(f"{stems[0]}.json"))
            caption = tar.extractfile(f"{stems[0]}.txt").read().decode()
            img = Image.open(tar.extractfile(f"{stems[0]}.png"))
            assert img.mode == "L" and img.size == (16, 16)
    assert meta["caption"] == caption == f"a handwritten digit {meta['label']}"
    assert meta["key"] == stems[0] and meta["status"] == "success" and meta["width"] == 16
    assert len(keys) == len(set(keys)) == 1797 and all(len(k) == 9 and k.isdigit() for k in keys)


# ------------------------------------------------------------------------------------- decode
class _Touch:  # unpickling this creates a file: proof of whether a pickle was ever loaded
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_decoder_refuses_pickle_and_never_unpickles(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Touch(live)))
    assert live.exists()  # the payload works when unpickled

    marker = tmp_path / "pwned"
    evil = dict(good(3), pkl=pickle.dumps(_Touch(marker)))
    with pytest.raises(SkipSample, match=r"unsafe or unknown member 'pkl' in sample 000000003"):
        decode_member("pkl", evil["pkl"], "000000003", "x.tar")
    for ext in ("pth", "pickle", "pyd", "weird"):
        with pytest.raises(SkipSample):
            decode_member(ext, b"")
    with pytest.raises(SkipSample):
        decode_sample(dict(evil, __url__="x.tar"))

    spec = write_tar(tmp_path / "evil.tar", [good(0), good(1), good(2), evil] + [good(i) for i in range(4, 8)])
    batch = take(ShardLoader(spec, 8, channels=1, image_size=16), 1)[0]
    assert "000000003" not in batch["keys"] and len(batch["keys"]) == 7
    assert not marker.exists()


def test_decode_members(tmp_path):
    from safetensors.torch import save

    assert decode_member("txt", "héllo".encode()) == "héllo"
    assert decode_member("json", b'{"label": 3}') == {"label": 3}
    assert decode_member("cls", b" 7\n") == 7
    buf = io.BytesIO()
    np.save(buf, np.arange(4))
    assert decode_member("npy", buf.getvalue()).tolist() == [0, 1, 2, 3]
    buf = io.BytesIO()
    np.save(buf, np.array([_Touch(tmp_path / "npy")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_member("npy", buf.getvalue())
    assert not (tmp_path / "npy").exists()
    t = decode_member("safetensors", save({"a": torch.ones(2)}))
    assert torch.equal(t["a"], torch.ones(2))
    assert decode_member("seg.png", png_bytes()).size == (16, 16)


def test_decompression_bomb_guard(monkeypatch):
    from difftrain.data import decode

    monkeypatch.setattr(decode, "MAX_PIXELS", 100)
    with pytest.raises(SkipSample, match="MAX_PIXELS") as err:
        decode_member("png", png_bytes(16))
    assert err.value.reason == "too_large"


def test_image_transform():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    x = image_transform(3, 16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[0].min() == 1.0 and x[1].max() == -1.0
    assert image_transform(1, 8)(img).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="data.channels"):
        image_transform(4, 8)


# ------------------------------------------------------------------------------------- loader
def test_batches_and_errors(digits):
    b = take(ShardLoader(digits["train"], B, channels=1, image_size=16), 1)[0]
    assert b["pixels"].shape == (B, 1, 16, 16) and b["pixels"].min() >= -1 and b["pixels"].max() <= 1
    assert b["position"] == {"epoch": 0, "batch_in_epoch": 0, "g": 0}
    assert b["index"].tolist() == list(range(B)) and b["labels"].dtype == torch.long
    assert all(c == f"a handwritten digit {l}" for c, l in zip(b["captions"], b["labels"].tolist()))
    from difftrain.config import DataConfig

    cfg = DataConfig(train=digits["train"], batch_size=B, num_workers=0, channels=1, image_size=16)
    assert_same(take(ShardLoader.from_config(cfg, rank=0, world=1, seed=0), 1)[0], b)
    with pytest.raises(ValueError, match="data.batch_size"):
        ShardLoader(digits["train"], 10, rank=0, world=4)
    with pytest.raises(ValueError, match="data.batch_size"):
        take(ShardLoader(digits["train"], 1024), 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_world_size_independent(digits, num_workers):
    kw = dict(num_workers=num_workers, seed=1, channels=1, image_size=16)
    whole = take(ShardLoader(digits["train"], B, 0, 1, **kw), 5)  # crosses an epoch
    ranks = [take(ShardLoader(digits["train"], B, r, 2, **kw), 5) for r in (0, 1)]
    for g in range(5):
        assert len(ranks[0][g]["keys"]) == B // 2
        assert_same(cat([ranks[0][g], ranks[1][g]]), whole[g])


def test_resume_exact_across_epoch_and_world(digits):
    kw = dict(seed=2, channels=1, image_size=16)
    ref = take(ShardLoader(digits["train"], B, **kw), 7)
    assert [b["position"]["epoch"] for b in ref] == [0, 0, 0, 0, 1, 1, 1]

    first = ShardLoader(digits["train"], B, num_workers=2, **kw)  # prefetches ahead
    take(first, 3)
    sd = first.state_dict()
    assert sd == {"epoch": 0, "batch_in_epoch": 3, "g": 3}
    sd = json.loads(json.dumps(sd))
    again = ShardLoader(digits["train"], B, **kw)
    again.load_state_dict(sd)
    for got, want in zip(take(again, 3), ref[3:6]):  # batches 4..6, over the epoch boundary
        assert_same(got, want)

    ranks = []  # resume a world-1 state on world 2, past the end of epoch 0
    for r in (0, 1):
        loader = ShardLoader(digits["train"], B, r, 2, **kw)
        loader.load_state_dict({"epoch": 0, "batch_in_epoch": 4, "g": 4})
        ranks.append(take(loader, 3))
    for g in range(3):
        assert_same(cat([ranks[0][g], ranks[1][g]]), ref[4 + g])


def test_epoch_reshuffles_shards(digits):
    loader = ShardLoader(digits["train"], B, seed=0, channels=1, image_size=16)
    orders = [loader.shard_order(e) for e in range(3)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == loader.shards
    batches = take(loader, 5)
    for e, b in ((0, batches[0]), (1, batches[4])):
        with tarfile.open(orders[e][0]) as tar:
            assert b["keys"][0] == tar.getnames()[0].split(".")[0]


def test_bad_samples_dropped_deterministically(tmp_path):
    dotted = {"__key__": "a.1", "png": png_bytes(), "txt": b"dotted"}  # -> key "a", member "1.png"
    broken = dict(good(5), png=b"\x89PNG not really")
    samples = [good(0), good(1), dotted, good(3), good(4), broken, good(6), good(7)]
    spec = write_tar(tmp_path / "bad.tar", samples)
    loader = ShardLoader(spec, 8, channels=1, image_size=16)
    whole = take(loader, 2)
    assert loader.skipped == {"missing_image": 2, "decode_error": 2}
    assert whole[0]["index"].tolist() == [0, 1, 3, 4, 6, 7]
    ranks = [take(ShardLoader(spec, 8, r, 2, channels=1, image_size=16), 1)[0] for r in (0, 1)]
    assert [len(r["keys"]) for r in ranks] == [3, 3]
    assert_same(cat(ranks), whole[0])


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (3, "L")])
def test_native_size_fast_path_equals_resize_path(channels, mode):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from difftrain.data.decode import image_transform

    img = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).convert(mode)
    general = v2.Compose([v2.ToImage(), v2.Resize(16, antialias=True), v2.CenterCrop(16),
                          v2.ToDtype(torch.float32, scale=True)])
    ref = general(img.convert("L" if channels == 1 else "RGB")) * 2.0 - 1.0
    assert torch.equal(image_transform(channels, 16)(img), ref)
