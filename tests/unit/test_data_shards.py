"""``difftrain data shards`` on a user's folder of real photos: sidecar and table captions, control images, a
corrupt file, a held-out split; read back with the trainer's own decoding and loader, rerun byte for byte."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from difftrain.cli import main
from difftrain.data import tario
from difftrain.data.decode import decode_sample
from difftrain.data.samples import SampleDecoder
from difftrain.data.spec import parse_spec
from difftrain.data.writers import write_image_shards

SIZE = 48


def photos() -> list[Image.Image]:
    """Two real photos: scikit-image's astronaut and coffee when it is installed, else scikit-learn's china and
    flower, read from the installed package's files (importing sklearn.datasets costs seconds)."""
    import importlib.util

    for pkg, folder, names in (("skimage", "data", ("astronaut.png", "coffee.png")),
                               ("sklearn", "datasets/images", ("china.jpg", "flower.jpg"))):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            files = [Path(list(spec.submodule_search_locations)[0]) / folder / n for n in names]
            if all(f.is_file() for f in files):
                return [Image.open(f).convert("RGB") for f in files]
    pytest.skip("neither scikit-image nor scikit-learn ships its sample photos here")


def edges(img: Image.Image) -> Image.Image:
    """A control image as ControlNet trains on: the photo's edge map (gray)."""
    return img.convert("L").filter(ImageFilter.FIND_EDGES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    """A user's folder; returns it and {url: (caption or None, control url or None)} of the readable images."""
    src = tmp_path_factory.mktemp("photos")
    a, b = (im.resize((320, 320 * im.height // im.width), Image.BICUBIC) for im in photos())
    (src / "pets").mkdir()
    a.save(src / "pets/one.jpg", quality=92)  # caption: a .txt sidecar
    (src / "pets/one.txt").write_text("a photo of one\n")
    b.save(src / "two.png")  # caption: the HF imagefolder table; control: an edge map beside it
    edges(b).save(src / "two.control.png")
    (src / "metadata.jsonl").write_text(json.dumps({"file_name": "two.png", "text": "a photo of two"}) + "\n"
                                        + json.dumps({"file_name": "gone.png", "text": "no such file"}) + "\n")
    (src / "gray").mkdir()  # caption: a gray/metadata.jsonl, relative to its own folder; grayscale -> RGB
    a.convert("L").crop((0, 0, 150, 200)).save(src / "gray/three.png")
    (src / "gray/metadata.jsonl").write_text(json.dumps({"file_name": "three.png", "text": "gray three"}))
    tall = b.crop((40, 0, 40 + 120, 200))  # no caption at all; control in the control/ folder
    tall.save(src / "four.webp", quality=90)
    (src / "control").mkdir()
    tall.filter(ImageFilter.GaussianBlur(3)).save(src / "control/four.png")
    whole = (src / "pets/one.jpg").read_bytes()
    (src / "pets/broken.jpg").write_bytes(whole[: len(whole) // 3])  # truncated: skipped, named, counted
    (src / "pets/broken.txt").write_text("never stored")
    (src / "notes.md").write_text("not an image")
    return src, {"pets/one.jpg": ("a photo of one", None), "two.png": ("a photo of two", "two.control.png"),
                 "gray/three.png": ("gray three", None), "four.webp": (None, "control/four.png")}


def fitted(path: Path, channels: int) -> np.ndarray:
    """What the command should store, by stock PIL: ``ImageOps.fit`` (centred square, LANCZOS), as [C, H, W]."""
    from difftrain.data.images import to_mode

    with Image.open(path) as im:
        x = np.asarray(ImageOps.fit(to_mode(im, channels), (SIZE, SIZE), Image.LANCZOS), dtype=np.float64)
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def shards(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tar"))


def run(argv: list[str], capfd) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def test_folder_to_shards_read_back(folder, tmp_path, capfd):
    src, want = folder
    out = tmp_path / "out"
    argv = ["data", "shards", str(src), "--out", str(out), "--image-size", str(SIZE), "--shard-size", "2",
            "--val", "1"]
    code, stdout, stderr = run(argv, capfd)
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["n"] == 4 and info["num_train"] + info["num_val"] == 4 and info["num_val"] <= 1
    assert info["skipped"] == {"unreadable_image": 1, "missing_image": 1}
    assert info["missing_caption"] == 1 and info["with_control"] == 2
    warned = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("difftrain:")]
    assert len([w for w in warned if "pets/broken.jpg" in w]) == 1  # named once, one line
    assert any(re.match(r"difftrain: warning: skipped 'pets/broken.jpg': cannot decode image", w) for w in warned)
    assert info["train"] == f"{out}/train/{{00000..00001}}.tar" and info["val"] == f"{out}/val/{{00000..00000}}.tar"

    # every sample through the trainer's decoding: pixels, caption, control, metadata
    decoder = SampleDecoder(channels=3, buckets=[(SIZE, SIZE)])
    got = {}
    for spec in (info["train"], info["val"]):
        for url in parse_spec(spec)[0].urls:
            for raw, _ in tario.read_shard(url):
                meta = json.loads(raw["json"])
                item = decoder(raw, lambda name: 0.5)
                members = decode_sample(raw)
                assert members[meta["url"].rsplit(".", 1)[1].lower()].size == (SIZE, SIZE)
                assert meta["caption"] == item["caption"] and meta["key"] == raw["__key__"]
                with Image.open(src / meta["url"]) as im:
                    assert (meta["original_width"], meta["original_height"]) == im.size
                got[meta["url"]] = (item, members.get("control.png"), meta)
    assert set(got) == set(want)
    expected = {url: fitted(src / url, 3) for url in want}
    for url, (item, control, meta) in got.items():
        caption, control_url = want[url]
        assert item["caption"] == (caption or "")
        x = item["pixels"].numpy().astype(np.float64)
        err = {u: np.abs(x - e).mean() for u, e in expected.items()}
        lossless = url.endswith(".png")  # jpg and webp sources are re-encoded in their own (lossy) format
        assert err[url] == 0 if lossless else err[url] < 6.0, (url, err)  # 4:2:0 chroma at 48 px
        assert min(v for u, v in err.items() if u != url) > 30, (url, err)  # and far from every other image
        if control_url is None:
            assert control is None and "control_url" not in meta
        else:
            assert meta["control_url"] == control_url and control.size == (SIZE, SIZE)
            c = np.asarray(control, dtype=np.float64)
            c = c[None] if c.ndim == 2 else c.transpose(2, 0, 1)
            assert c.shape[0] == (1 if url == "two.png" else 3)  # a gray edge map stays gray
            assert np.array_equal(c, fitted(src / control_url, c.shape[0]))  # aligned with its image, lossless

    # the project's loader streams the training split as the trainer would
    from difftrain.data.loader import ShardLoader

    batch = next(iter(ShardLoader(info["train"], 2, channels=3, image_size=SIZE)))
    assert tuple(batch["pixels"].shape) == (2, 3, SIZE, SIZE)
    assert set(batch["captions"]) <= {c or "" for c, _ in want.values()}

    # a rerun writes the same bytes; a non-empty --out is refused unless --overwrite
    again = tmp_path / "again"
    assert run(argv[:4] + [str(again)] + argv[5:], capfd)[0] == 0
    assert [p.relative_to(again) for p in shards(again)] == [p.relative_to(out) for p in shards(out)]
    assert all(p.read_bytes() == (again / p.relative_to(out)).read_bytes() for p in shards(out))
    code, _, stderr = run(argv, capfd)
    assert code == 2 and stderr.strip().splitlines() == [
        f"difftrain: error: output folder '{out}' is not empty; --overwrite (overwrite=True) replaces the shards in it"]
    (out / "train/00007.tar").write_bytes(b"a stale shard of an earlier, larger run")
    (out / "keep.txt").write_text("not ours")
    assert run(argv + ["--overwrite"], capfd)[0] == 0
    assert all(p.read_bytes() == (again / p.relative_to(out)).read_bytes() for p in shards(out))
    assert not (out / "train/00007.tar").exists() and (out / "keep.txt").exists()


def test_keep_sizes_and_bad_controls(folder, tmp_path, capfd):
    src, want = folder
    # without --image-size the sizes are kept and png sources stored byte for byte; controls as PNG of the same size
    info = write_image_shards(src, tmp_path / "keep", seed=None, progress=False)
    assert info["n"] == 4 and info["with_control"] == 2 and info["spec"] == f"{tmp_path}/keep/{{00000..00000}}.tar"
    samples = {json.loads(raw["json"])["url"]: raw for raw, _ in tario.read_shard(str(tmp_path / "keep/00000.tar"))}
    assert list(samples) == sorted(want)  # seed=None: sorted paths, keys in that order
    assert samples["two.png"]["png"] == (src / "two.png").read_bytes()
    with Image.open(io.BytesIO(samples["two.png"]["control.png"])) as c, Image.open(src / "two.control.png") as ref:
        assert c.mode == "L" and np.array_equal(np.asarray(c), np.asarray(ref))

    # a control of another size, or a corrupt one, skips its sample (named, counted); the job goes on
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("one.png", "two.png", "three.png"):
        with Image.open(src / "two.png") as im:
            im.save(bad / name)
    with Image.open(src / "two.control.png") as c:
        c.resize((c.width // 2, c.height // 2)).save(bad / "one.control.png")
    (bad / "two.control.png").write_bytes((src / "two.control.png").read_bytes()[:200])
    (bad / "captions.csv").write_text("image,caption\nthree.png,\"a csv caption, quoted\"\n")
    info = write_image_shards(bad, tmp_path / "bad_out", progress=False)
    assert info["n"] == 1 and info["skipped"] == {"control_size_mismatch": 1, "unreadable_control": 1}
    assert info["missing_caption"] == 0 and info["with_control"] == 0
    (raw, _), = tario.read_shard(str(tmp_path / "bad_out/00000.tar"))
    assert raw["txt"] == b"a csv caption, quoted" and "control.png" not in raw
    err = capfd.readouterr().err
    assert re.search(r"difftrain: warning: skipped 'one.png': control image 'one.control.png': \d+x\d+ px, "
                     r"its image is \d+x\d+ px", err)
    assert "skipped 'two.png': control image 'two.control.png': cannot decode image" in err


def test_bad_folders(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    code, _, err = run(["data", "shards", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and err.strip().splitlines() == [
        f"difftrain: error: no images to write: none of .png, .jpg, .jpeg, .webp under '{tmp_path / 'empty'}'"]
    Image.new("RGB", (8, 8)).save(tmp_path / "empty/a.png")
    (tmp_path / "empty/metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png"}\n')
    code, _, err = run(["data", "shards", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and re.fullmatch(r"difftrain: error: captions file '.*metadata.jsonl' line 2 has no column "
                                      r"'text' or 'caption' \(columns: file_name\)", err.strip())
    (tmp_path / "empty/sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty/sub/b.png")
    (tmp_path / "empty/metadata.jsonl").write_text('{"file_name": "sub/b.png", "text": "b"}\n')
    (tmp_path / "empty/sub/captions.csv").write_text("file_name,text\nb.png,another b\n")
    code, _, err = run(["data", "shards", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and err.strip() == ("difftrain: error: image 'sub/b.png' has two captions, in "
                                         "'metadata.jsonl' and 'sub/captions.csv'")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one/a.png")
    code, _, err = run(["data", "shards", str(tmp_path / "one"), "--out", str(tmp_path / "o"), "--val", "1"], capfd)
    assert code == 2 and err.strip() == ("difftrain: error: a held-out set of 1 leaves no training sample: "
                                         f"'{tmp_path / 'one'}' has 1")
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["data", "shards", str(tmp_path), "--out", "o", "--val", "1", "--val-frac", "0.1"])
