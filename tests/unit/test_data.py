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

from difftrain.data.decode import SkipSample, decode_member, decode_sample
from difftrain.data.demo import write_digits
from difftrain.data.loader import ShardLoader
from difftrain.data.spec import parse_spec



@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return write_digits(out, image_size=16, shard_size=32, val_fraction=0.85, seed=0, progress=False)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


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
    train, val = (list(parse_spec(digits[k])[0].urls) for k in ("train", "val"))
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


def _members(spec):
    out = {}
    for shard in parse_spec(spec)[0].urls:
        with tarfile.open(shard) as tar:
            out.update({n: tar.extractfile(n).read() for n in tar.getnames()})
    return out


def test_demo_bold_style_same_samples_more_ink(tmp_path, capsys):
    """``data demo --style bold``: the same split, keys, captions and records as the plain digits, every image's
    strokes dilated (never darker anywhere, about 1.5x the ink)."""
    from difftrain.cli import main

    plain = write_digits(tmp_path / "plain", progress=False)
    main(["data", "demo", "--out", str(tmp_path / "bold"), "--style", "bold"])
    bold = json.loads(capsys.readouterr().out)
    assert (bold["num_train"], bold["num_val"]) == (plain["num_train"], plain["num_val"]) == (1617, 180)
    ink = []
    for split in ("train", "val"):
        a, b = _members(plain[split]), _members(bold[split])
        assert sorted(a) == sorted(b)
        for name in a:
            if name.endswith(".png"):
                pa, pb = (np.asarray(Image.open(io.BytesIO(m[name]))).astype(int) for m in (a, b))
                assert pa.shape == pb.shape == (16, 16) and (pb >= pa).all()
                ink.append(pb.sum() / pa.sum())
            else:  # caption and record (label, key) unchanged
                assert a[name] == b[name], name
    assert len(ink) == 1797 and 1.3 < np.mean(ink) < 1.8 and min(ink) > 1.1
    with pytest.raises(ValueError, match="unknown digits style 'thin'"):
        write_digits(tmp_path / "thin", style="thin", progress=False)
    with pytest.raises(SystemExit) as e:  # the moving digits have no style: refused, not ignored
        main(["data", "demo", "--out", str(tmp_path / "video"), "--video", "--style", "bold"])
    assert e.value.code == 2 and "--style bold" in capsys.readouterr().err
    assert not (tmp_path / "video").exists()


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
    loader = ShardLoader(spec, 7, channels=1, image_size=16)
    batch = take(loader, 1)[0]
    assert "000000003" not in batch["keys"] and len(batch["keys"]) == 7 and loader.skipped == {"unsafe_member": 1}
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


def test_image_transform_and_native_size_path():
    from torchvision.transforms import v2

    from difftrain.data.images import ImageTransform, to_unit

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    x = to_unit(ImageTransform(3)(img, (16, 16), None))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[0].min() == 1.0 and x[1].max() == -1.0
    assert ImageTransform(1)(img, (8, 8), None).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="data.channels"):
        ImageTransform(4)
    rnd = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    ref = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])(rnd) * 2.0 - 1.0
    assert torch.equal(to_unit(ImageTransform(3)(rnd, (16, 16), None)), ref)  # native size: no resampling
