"""Control images for ControlNet training (``data.control``) on real tars: shard members aligned with their
image under random crop, flip and buckets; transforms equal to the transform of the decoded image; samples
without a control member skipped and counted; exact resume; config errors."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import ConfigError, DataConfig
from difftrain.config_checks import from_dict
from difftrain.data.control import CONTROLS, apply_control, register_control
from difftrain.data.loader import ShardLoader
from difftrain.data.samples import SampleDecoder
from difftrain.data.writers import write_image_shards
from tests.unit.test_data import take, write_tar

BUCKETS = [(16, 16), (12, 20)]
SIZES = [(24, 20), (20, 26), (30, 18), (17, 17), (40, 22), (21, 33)]  # (w, h): resized, then cropped


def _noise(size, seed, mode="RGB"):
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder of noise images, each with ``NAME.control.png`` = the image itself, through ``data shards``."""
    src = tmp_path_factory.mktemp("src")
    for i in range(24):
        img = _noise(SIZES[i % len(SIZES)], i)
        img.save(src / f"x{i:02d}.png")
        img.save(src / f"x{i:02d}.control.png")
        (src / f"x{i:02d}.txt").write_text(f"noise {i}")
    info = write_image_shards(src, tmp_path_factory.mktemp("shards"), shard_size=8, progress=False)
    assert info["n"] == 24 and info["with_control"] == 24
    return info["spec"]


def _decoder(control, **kw):
    kw = {"channels": 3, "buckets": BUCKETS, "crop": "random", "flip": True, **kw}
    return SampleDecoder(control=control, **kw)


def _same(a, b):
    assert a["keys"] == b["keys"] and a["urls"] == b["urls"]
    for k in ("pixels", "control", "index"):
        assert torch.equal(a[k], b[k]), k


def test_member_control_is_cropped_and_flipped_with_its_image(shards):
    batches = take(ShardLoader(shards, 4, decoder=_decoder("member"), shuffle_buffer=6), 8)
    shapes = set()
    for b in batches:
        assert b["control"].dtype == torch.uint8 and b["control"].shape == b["pixels"].shape
        assert b["control"].stride() == b["pixels"].stride()  # channels last, as the pixels
        assert torch.equal(b["control"], b["pixels"])  # the control is the image: the same crop and flip
        shapes.add(tuple(b["pixels"].shape[-2:]))
    assert shapes == {(16, 16), (12, 20)}
    # the draws did move: a center crop without flips gives other pixels for some samples
    plain = take(ShardLoader(shards, 4, decoder=_decoder("member", crop="center", flip=False), shuffle_buffer=6), 8)
    assert [b["keys"] for b in plain] == [b["keys"] for b in batches]
    assert any(not torch.equal(p["pixels"], b["pixels"]) for p, b in zip(plain, batches))
    # a worker process gives the same batches, its shared-memory buffers reused once each batch is dropped
    it = iter(ShardLoader(shards, 4, decoder=_decoder("member"), shuffle_buffer=6, num_workers=1, prefetch_factor=1))
    ptrs = set()
    for ref in batches:
        b = next(it)
        _same(b, ref)
        ptrs.add(b["control"].data_ptr())
        del b
    it.close()
    assert len(ptrs) < len(batches)
    # and so does the config path
    cfg = DataConfig(train=shards, batch_size=4, num_workers=0, buckets=[list(b) for b in BUCKETS], crop="random",
                     flip=True, shuffle_buffer=6, control="member", require_caption=False)
    _same(take(ShardLoader.from_config(cfg, rank=0, world=1, seed=0), 1)[0], batches[0])
    assert "control" not in take(ShardLoader(shards, 4, decoder=_decoder("")), 1)[0]  # off: the member is unused


def test_a_control_member_of_another_size_is_stretched_onto_its_image(tmp_path):
    samples = []
    for i, (w, h) in enumerate(SIZES * 2):
        img = np.zeros((h, w), np.uint8)
        img[:, w // 2:] = 255  # a vertical step; the control has it too, at twice the size and in RGB
        ctrl = np.zeros((2 * h, 2 * w, 3), np.uint8)
        ctrl[:, w:] = 255
        samples.append({"__key__": f"{i:04d}", "png": _png(Image.fromarray(img)),
                        "control.png": _png(Image.fromarray(ctrl))})
    b = take(ShardLoader(write_tar(tmp_path / "s.tar", samples), 12, decoder=_decoder("member", channels=1,
                                                                                       buckets=[(16, 16)])), 1)[0]
    px, ct = b["pixels"][:, 0] > 127, b["control"][:, 0] > 127
    assert b["control"].shape == (12, 1, 16, 16)
    assert ((px != ct).sum(-1) <= 1).all()  # the step in the same place (one column of rounding at most)
    white_left = px[:, :, 0].all(-1)  # flipped: the step runs white to black
    assert bool((white_left != px[:, :, -1].all(-1)).all()) and 0 < int(white_left.sum()) < 12


@pytest.mark.parametrize("name", ["edges", "blur", "grayscale", "mine"])
def test_a_transform_control_is_the_transform_of_the_decoded_image(shards, name):
    if name == "mine":
        register_control("mine", lambda a: 255 - a[..., ::-1])  # a user's transform: inverted, channels swapped
    try:
        assert from_dict({"data": {"control": name}, "adapt": [{"kind": "controlnet"}]}).data.control == name
        b = take(ShardLoader(shards, 4, decoder=_decoder(name), shuffle_buffer=6), 2)[1]
    finally:
        CONTROLS.pop("mine", None)
    assert b["control"].shape == b["pixels"].shape and b["control"].dtype == torch.uint8
    assert b["control"].stride() == b["pixels"].stride()
    x = b["pixels"].permute(0, 2, 3, 1).numpy().astype(np.float64)  # [B, h, w, 3]
    got = b["control"].permute(0, 2, 3, 1).numpy()
    luma = x @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's convert("L")
    if name == "edges":
        from scipy import ndimage

        y = np.rint(luma)
        mag = np.stack([np.hypot(ndimage.sobel(v, 1, mode="nearest"), ndimage.sobel(v, 0, mode="nearest")) for v in y])
        want = np.where(mag > 0.2 * 1020, 255, 0)
        assert set(np.unique(got)) == {0, 255}
        near = np.abs(mag - 0.2 * 1020) < 2  # luma rounding may move a pixel across the threshold
        assert ((got[..., 0] == want) | near).all() and (got == got[..., :1]).all()
    elif name == "blur":
        from scipy import ndimage

        sigma = max(1.0, min(x.shape[1:3]) / 32)  # the default
        want = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect")
        assert np.abs(got - want).mean() < 4 < np.abs(got - x).mean()  # PIL's box approximation, close
    elif name == "grayscale":
        assert np.abs(got - luma[..., None]).max() <= 1 and (got == got[..., :1]).all()
    else:
        assert np.array_equal(got, 255 - x[..., ::-1])


def test_a_transform_that_breaks_the_contract_is_named():
    x = torch.zeros(3, 8, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="control transform 'half' returned 3x4 px for a 6x8 px image"):
        apply_control(lambda a: a[::2, ::2], "half", x, 3)
    with pytest.raises(ValueError, match="'f32' must return a uint8"):
        apply_control(lambda a: a.astype(np.float32), "f32", x, 3)
    gray = apply_control(lambda a: a[..., 0] > 0, "mask", x + 1, 1)  # bool, 2-D, to data.channels = 1
    assert gray.shape == (1, 8, 6) and int(gray.min()) == 255


def test_samples_without_a_control_member_are_skipped_and_counted(tmp_path):
    samples = []
    for i in range(12):
        s = {"__key__": f"{i:04d}", "png": _png(_noise((16, 16), i)), "txt": b"a caption"}
        if i % 4 == 1:
            pass  # no control member
        elif i == 6:
            s["control.png"] = b"not an image"
        else:
            s["control.jpg" if i % 2 else "control.png"] = _png(_noise((16, 16), i + 100))
        samples.append(s)
    spec = write_tar(tmp_path / "s.tar", samples)
    ld = ShardLoader(spec, 8, decoder=_decoder("member", buckets=[(16, 16)]))
    b = take(ld, 1)[0]
    assert b["keys"] == [f"{i:04d}" for i in range(12) if i % 4 != 1 and i != 6]
    assert ld.skipped == {"missing_control": 3, "decode_error": 1}
    assert ld.counts()["skipped/missing_control"] == 3
    plain = ShardLoader(spec, 8, decoder=_decoder("", buckets=[(16, 16)]))
    take(plain, 1)
    assert plain.skipped == {}  # without data.control the same samples are all good


def test_resume_mid_epoch_gives_the_same_control_images(shards):
    kw = dict(shuffle_buffer=6, seed=3)
    for name in ("member", "edges"):
        ref = take(ShardLoader(shards, 4, decoder=_decoder(name), **kw), 10)  # 40 samples: into epoch 1
        first = ShardLoader(shards, 4, decoder=_decoder(name), **kw)
        take(first, 4)
        again = ShardLoader(shards, 4, decoder=_decoder(name), **kw)
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for a, b in zip(take(again, 6), ref[4:]):
            _same(a, b)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"'data.control' = 'edgez' is not one of: '', member, edges, blur, "
                                          r"grayscale"):
        from_dict({"data": {"control": "edgez"}})
    with pytest.raises(ConfigError, match="'data.control' = 'member' needs data.kind=image"):
        from_dict({"data": {"kind": "video", "control": "member"}, "model": {"frames": 4}})
    with pytest.raises(ConfigError, match="'data.control' = 'edges' needs data.kind=image"):
        from_dict({"data": {"kind": "latent", "control": "edges"}})
    with pytest.raises(ValueError, match="'data.control' = 'blur' needs data.kind=image"):
        SampleDecoder(kind="video", control="blur")
    with pytest.raises(ValueError, match="'data.control' = 'nope' is not one of"):
        SampleDecoder(control="nope")
    with pytest.raises(ValueError, match="other than '', 'member'"):
        register_control("member", lambda a: a)
    with pytest.raises(ValueError, match="'x' must be callable"):
        register_control("x", 3)
    assert from_dict({}).data.control == ""
