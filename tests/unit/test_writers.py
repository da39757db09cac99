"""writers: an image folder -> img2dataset-layout shards, checked member by member on real photos."""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftrain.config import ConfigError
from difftrain.data import writers
from difftrain.data.folder import find_images, read_captions
from difftrain.data.writers import add_shards_args, run_shards, sample_photo_folder, write_image_shards

try:
    import pyarrow  # noqa: F401
    HAVE_PYARROW = True
except ImportError:
    HAVE_PYARROW = False

FIELDS = ["caption", "url", "key", "status", "error_message", "width", "height", "original_width",
          "original_height", "exif", "sha256"]
STATS = ["count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
         "end_time", "status_dict"]
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return sample_photo_folder(tmp_path_factory.mktemp("photos"), n=10, size_range=(160, 320), seed=0)


def save(path: Path, img: Image.Image, fmt: str, caption: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgba = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256, 255 - x * 255 // w], -1).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert all(m.isfile() for m in members)
        return [(m.name, tar.extractfile(m).read()) for m in members]


def check_shards(src: Path, out: Path, info: dict, shard_size: int, num_inputs: int) -> dict[str, list]:
    """Check the layout, every member and every field; returns url -> [(key, meta, ext, bytes)]."""
    K = -(-num_inputs // shard_size)
    names = {f"{s:05d}{x}" for s in range(K) for x in (".tar", "_stats.json") + ((".parquet",) * HAVE_PYARROW)}
    assert {p.name for p in out.iterdir()} == names  # no temp files, nothing else
    assert info["spec"] == f"{out}/{{00000..{K - 1:05d}}}.tar"
    by_url, stored = defaultdict(list), 0
    for s in range(K):
        count = min(shard_size, num_inputs - s * shard_size)
        members = read_tar(out / f"{s:05d}.tar")
        groups = defaultdict(dict)
        for name, data in members:
            key, ext = name.split(".", 1)
            groups[key][ext] = data
        stats = json.loads((out / f"{s:05d}_stats.json").read_text())
        assert list(stats) == STATS
        assert stats["count"] == count and stats["successes"] == len(groups)
        assert stats["failed_to_download"] == 0 and stats["failed_to_resize"] == count - len(groups)
        assert sum(stats["status_dict"].values()) == count
        assert stats["status_dict"].get("success", 0) == len(groups)
        if HAVE_PYARROW:  # one row per input sample, failures included
            import pyarrow.parquet as pq

            rows = pq.read_table(out / f"{s:05d}.parquet").to_pylist()
            assert [r["key"] for r in rows] == [f"{s:05d}{i:04d}" for i in range(count)]
            assert sum(r["status"] == "success" for r in rows) == len(groups) and list(rows[0]) == FIELDS
        for key, m in groups.items():
            assert re.fullmatch(rf"{s:05d}\d{{4}}", key) and int(key[5:]) < count
            (ext,) = set(m) - {"txt", "json"}
            meta = json.loads(m["json"])
            assert sorted(m) == sorted([ext, "json"] + ["txt"] * bool(meta["caption"]))  # no empty txt member
            assert list(meta) == FIELDS
            assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
            assert meta["caption"] == m.get("txt", b"").decode("utf-8")
            assert meta["sha256"] == hashlib.sha256(m[ext]).hexdigest()
            with Image.open(io.BytesIO(m[ext])) as im:
                assert EXT[im.format] == ext and im.size == (meta["width"], meta["height"])
            source = src / meta["url"]
            assert (meta["original_width"], meta["original_height"]) == size_of(source.read_bytes())
            by_url[meta["url"]].append((key, meta, ext, m[ext]))
            stored += 1
    assert stored == info["n"]
    return by_url


def test_sidecars_keep_bytes_and_counted_failures(photos, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photos, src)
    sources = find_images(src)
    nocap = sources[3]
    (src / nocap).with_suffix(".txt").unlink()
    save(src / "extra/gray.png", gradient(300, 200, "L"), "PNG", "a gray ramp")
    save(src / "extra/pic.WEBP", gradient(240, 260), "WEBP", "a color ramp", quality=90)
    (src / "bad").mkdir()
    (src / "bad/broken.jpg").write_bytes(b"this is not an image")
    whole = (src / sources[0]).read_bytes()
    (src / "bad/truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (src / "notes.md").write_text("not an image")
    out = tmp_path / "out"

    info = write_image_shards(src, out, shard_size=4, progress=False)
    assert info["n"] == 12 and info["skipped"] == {"unreadable_image": 2} and info["missing_caption"] == 1
    by_url = check_shards(src, out, info, shard_size=4, num_inputs=14)
    assert set(by_url) == set(find_images(src)) - {"bad/broken.jpg", "bad/truncated.JPEG"}
    for url, [(key, meta, ext, data)] in by_url.items():
        assert data == (src / url).read_bytes()  # fmt="keep": the source bytes, untouched
        side = (src / url).with_suffix(".txt")
        assert meta["caption"] == (side.read_text().strip() if side.exists() else "")
    assert by_url[nocap][0][1]["caption"] == ""
    assert by_url["extra/gray.png"][0][2] == "png" and by_url["extra/pic.WEBP"][0][2] == "webp"
    assert re.fullmatch(r"a photo of .+, crop \d+", by_url[sources[0]][0][1]["caption"])
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["failed_to_resize"] for s in stats) == 2
    failed = sorted(msg for s in stats for msg in s["status_dict"] if msg != "success")
    assert failed[0].startswith("cannot decode image: ") and failed[1:] == ["not a png, jpeg or webp image"]

    # seed permutes the sorted order reproducibly (byte-identical tars); seed=None keeps it sorted
    again = write_image_shards(src, tmp_path / "again", shard_size=4, progress=False)
    assert again["n"] == 12
    for p in out.glob("*.tar"):
        assert p.read_bytes() == (tmp_path / "again" / p.name).read_bytes()
    info = write_image_shards(src, tmp_path / "sorted", shard_size=4, seed=None, progress=False)
    order = sorted(by_url, key=lambda u: by_url[u][0][0])
    ordered = check_shards(src, tmp_path / "sorted", info, shard_size=4, num_inputs=14)
    assert sorted(ordered, key=lambda u: ordered[u][0][0]) == sorted(ordered) and order != sorted(order)


def test_loader_reads_the_shards(photos, tmp_path):
    from difftrain.data.loader import ShardLoader

    info = write_image_shards(photos, tmp_path, shard_size=4, progress=False)
    batch = next(iter(ShardLoader(info["spec"], 4, channels=3, image_size=32)))
    assert tuple(batch["pixels"].shape) == (4, 3, 32, 32)
    assert all(re.fullmatch(r"a photo of .+, crop \d+", c) for c in batch["captions"])


def write_csv(path: Path, rows: list[tuple[str, str]], cols=("file", "text")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return path


def caption_rows(photos) -> list[tuple[str, str]]:
    urls = find_images(photos)
    rows = [(u, f"csv caption {i}") for i, u in enumerate(urls[:6])]
    rows += [("nope/missing.jpg", "gone"), ("./" + urls[0], 'a, "quoted" café\nsecond line')]
    return rows


def check_caption_file(photos, tmp_path, captions, rows):
    out = tmp_path / "out"
    info = write_image_shards(photos, out, captions=captions, shard_size=3, progress=False,
                              image_col="file", caption_col="text")
    assert info["n"] == 7 and info["missing_caption"] == 0
    assert info["skipped"] == {"missing_image": 1, "not_in_caption_file": 4}
    by_url = check_shards(photos, out, info, shard_size=3, num_inputs=7)
    want = defaultdict(list)
    for url, cap in rows:
        if url != "nope/missing.jpg":
            want[url.removeprefix("./")].append(cap)
    assert {u: sorted(m["caption"] for _, m, _, _ in v) for u, v in by_url.items()} == \
        {u: sorted(c) for u, c in want.items()}


def test_csv_captions(photos, tmp_path):
    rows = caption_rows(photos)
    path = write_csv(tmp_path / "captions.csv", rows)
    assert read_captions(path, "file", "text")[-1] == (rows[-1][0][2:], rows[-1][1])
    check_caption_file(photos, tmp_path, path, rows)
    with pytest.raises(ValueError, match=r"has no column 'image' \(columns: file, text\)"):
        write_image_shards(photos, tmp_path / "x", captions=path, progress=False)
    with pytest.raises(ValueError, match=r"must be \.csv, \.jsonl or \.parquet"):
        read_captions(tmp_path / "out" / "00000_stats.json")


def test_parquet_captions(photos, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = caption_rows(photos)
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"file": [r[0] for r in rows], "text": [r[1] for r in rows]}), path)
    check_caption_file(photos, tmp_path, path, rows)
    meta = pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    assert len(meta) == 3 and list(meta[0]) == FIELDS and meta[0]["key"] == "000000000"


def test_parquet_needs_pyarrow(photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "captions.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"^reading captions from '.*captions.parquet' needs pyarrow"):
        write_image_shards(photos, tmp_path / "out", captions=path, progress=False)
    info = write_image_shards(photos, tmp_path / "out", shard_size=6, progress=False)
    assert info["n"] == 10 and not list((tmp_path / "out").glob("*.parquet"))  # no pyarrow: no parquet


def test_resize_only_downscales_and_reencodes(photos, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photos, src)
    save(src / "small/tiny.jpg", gradient(150, 110), "JPEG", "small", quality=90)
    save(src / "small/alpha.png", gradient(260, 400, "RGBA"), "PNG", "with alpha")
    save(src / "small/gray.png", gradient(90, 70, "L"), "PNG", "gray")
    n = len(find_images(src))

    info = write_image_shards(src, tmp_path / "keep", resize=200, progress=False)
    assert info["n"] == n and info["skipped"] == {}
    cases = Counter()
    for url, [(_, meta, ext, data)] in check_shards(src, tmp_path / "keep", info, 10000, n).items():
        ow, oh, w, h = meta["original_width"], meta["original_height"], meta["width"], meta["height"]
        source = (src / url).read_bytes()
        if min(ow, oh) > 200:  # downscaled: shorter side 200, aspect kept, same format, new bytes
            assert min(w, h) == 200 and max(w, h) == round(max(ow, oh) * 200 / min(ow, oh))
            assert ext == url.rsplit(".", 1)[1].lower() and data != source
            cases["down"] += 1
        else:  # never upscaled, and the bytes stay the source's
            assert (w, h) == (ow, oh) and data == source
            cases["kept"] += 1
    assert cases["down"] >= 3 and cases["kept"] >= 2

    info = write_image_shards(src, tmp_path / "png", fmt="png", progress=False)  # lossless re-encode
    for url, [(_, meta, ext, data)] in check_shards(src, tmp_path / "png", info, 10000, n).items():
        with Image.open(src / url) as a, Image.open(io.BytesIO(data)) as b:
            assert ext == "png" and np.array_equal(np.asarray(a), np.asarray(b))

    info = write_image_shards(src, tmp_path / "jpg", fmt="jpg", resize=128, quality=80, progress=False)
    by_url = check_shards(src, tmp_path / "jpg", info, 10000, n)
    assert {ext for v in by_url.values() for _, _, ext, _ in v} == {"jpg"}
    with Image.open(io.BytesIO(by_url["small/alpha.png"][0][3])) as im:
        assert im.mode == "RGB" and im.size == (128, 197)
    info = write_image_shards(src, tmp_path / "webp", fmt="webp", quality=80, progress=False)
    by_url = check_shards(src, tmp_path / "webp", info, 10000, n)
    assert {ext for v in by_url.values() for _, _, ext, _ in v} == {"webp"}


def test_shard_is_renamed_only_when_complete(photos, tmp_path, monkeypatch):
    out, calls = tmp_path / "out", []
    encode = writers._encode

    def watched(*args):
        shard = len(calls) // 4
        assert (out / f"{shard:05d}.tar.tmp").exists() and not (out / f"{shard:05d}.tar").exists()
        assert all((out / f"{s:05d}{x}").exists() for s in range(shard) for x in (".tar", "_stats.json"))
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("killed in shard 1")
        return encode(*args)

    monkeypatch.setattr(writers, "_encode", watched)
    with pytest.raises(RuntimeError, match="killed"):
        write_image_shards(photos, out, shard_size=4, progress=False)
    assert {p.name for p in out.iterdir()} == {"00000.tar", "00000_stats.json"} | (
        {"00000.parquet"} if HAVE_PYARROW else set())
    assert len(read_tar(out / "00000.tar")) == 4 * 3  # the finished shard is whole

    monkeypatch.setattr(writers, "_encode", encode)
    (out / "00001.tar.tmp").write_bytes(b"left by a killed run")
    with pytest.raises(ValueError, match=r"^output folder '.*out' is not empty; --overwrite"):
        write_image_shards(photos, out, shard_size=4, progress=False)
    info = write_image_shards(photos, out, shard_size=4, progress=False, overwrite=True)
    check_shards(photos, out, info, shard_size=4, num_inputs=10)  # stale temp file removed


def test_cli_args(photos, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_shards_args(p)
    path = write_csv(tmp_path / "c.csv", caption_rows(photos))
    args = p.parse_args([str(photos), "--out", str(tmp_path / "out"), "--captions", str(path),
                         "--image-col", "file", "--caption-col", "text", "--shard-size", "3",
                         "--resize", "150", "--format", "jpg", "--quality", "85", "--seed", "1"])
    assert (args.shard_size, args.resize, args.fmt, args.quality, args.seed) == (3, 150, "jpg", 85, 1)
    info = run_shards(args)
    assert json.loads(capsys.readouterr().out) == info and info["n"] == 7
    defaults = p.parse_args([str(photos), "--out", "o"])
    assert (defaults.captions, defaults.shard_size, defaults.resize, defaults.fmt, defaults.quality,
            defaults.seed, defaults.image_col, defaults.caption_col) == \
        (None, 10000, None, "keep", 95, 0, "image", "caption")
    with pytest.raises(ConfigError, match=r"^captions file '.*nope.csv' does not exist$"):
        run_shards(p.parse_args([str(photos), "--out", "o", "--captions", str(tmp_path / "nope.csv")]))
    with pytest.raises(SystemExit):
        p.parse_args([str(photos), "--out", "o", "--format", "gif"])


@pytest.mark.parametrize("kw, match", [
    ({"shard_size": 0}, "shard_size must be > 0"),
    ({"resize": 0}, "resize must be > 0"),
    ({"fmt": "gif"}, "fmt must be one of keep, jpg, png, webp"),
    ({"quality": 0}, r"quality must be in \[1, 100\]"),
])
def test_bad_arguments(photos, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        write_image_shards(photos, tmp_path, progress=False, **kw)


def test_empty_or_missing_folder_and_wide_keys(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        write_image_shards(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="no images to write"):
        write_image_shards(tmp_path / "src", tmp_path / "out", progress=False)
    save(tmp_path / "src/a.png", gradient(20, 10), "PNG")
    info = write_image_shards(tmp_path / "src", tmp_path / "out", shard_size=20000, progress=False)
    assert [n for n, _ in read_tar(tmp_path / "out/00000.tar")] == [  # 20000 > 10**4: 5-digit index
        "0000000000.json", "0000000000.png"]  # uncaptioned: no (zero-byte) txt member
    assert info["missing_caption"] == 1


def test_sample_photo_folder(photos, tmp_path):
    images = find_images(photos)
    assert len(images) == 10 and len({i.split("/")[0] for i in images}) >= 2
    for rel in images:
        with Image.open(photos / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert all(160 <= s <= 320 for s in im.size)  # every source photo is >= 300 px a side
        assert re.fullmatch(r"a photo of .+, crop \d+\n", (photos / rel).with_suffix(".txt").read_text())
    a = sample_photo_folder(tmp_path / "a", n=3, size_range=(64, 96), seed=5)
    b = sample_photo_folder(tmp_path / "b", n=3, size_range=(64, 96), seed=5)
    assert [(a / r).read_bytes() for r in find_images(a)] == [(b / r).read_bytes() for r in find_images(b)]
