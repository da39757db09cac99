"""An image folder with captions -> webdataset shards in the img2dataset layout.

:func:`write_image_shards` writes the files img2dataset's ``--output_format webdataset`` writes::

    out/00000.tar           000000000.jpg  000000000.txt  000000000.json  000000001.jpg ...
    out/00000_stats.json    {"count", "successes", "failed_to_download", "failed_to_resize",
                             "duration", "start_time", "end_time", "status_dict"}
    out/00000.parquet       one row per sample of the shard (only when pyarrow is importable)
    out/00001.tar ...

Each sample's JSON has img2dataset's fields, in its order: ``caption``, ``url`` (here the image's
path relative to ``src``), ``key``, ``status``, ``error_message``, ``width``, ``height`` (of the
stored image), ``original_width``, ``original_height`` (of the source file), ``exif`` and
``sha256``. As in img2dataset, sample ``i`` of the (ordered) input goes to shard
``i // shard_size`` at index ``i % shard_size`` whether or not it can be read, its key is
``f"{shard:05d}{index:04d}"`` (the index is wider when ``shard_size > 10**4``), and an image that
cannot be decoded keeps its key but only appears in the stats (``failed_to_resize``) and the
parquet (``status="failed_to_resize"``), never in the tar. A shard is written under a temporary
name and renamed when complete (tar, then parquet, then the stats file, which marks it done), so
a killed run never leaves a partial file under a final name.

Two differences from img2dataset, both deliberate: ``sha256`` hashes the *stored* bytes (the same
as the source's with ``fmt="keep"`` and no resize; img2dataset hashes the downloaded bytes), and a
re-encoded image is first rotated upright by its EXIF orientation, since the EXIF is not carried
over (img2dataset ignores the orientation). Tar members have mtime 0, so shards are reproducible.

:func:`sample_photo_folder` makes a realistic image folder (random JPEG crops of the photos that
ship with scikit-learn and scikit-image) for the tests and the data-throughput benchmark.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from difftrain.data.decode import IMAGE_EXTS, MAX_PIXELS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)
FORMATS = ("keep", "jpg", "png", "webp")
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # what the loader's whitelist decodes; nothing else is read
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SAVE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_META_FIELDS = ("caption", "url", "key", "status", "error_message", "width", "height",
                "original_width", "original_height", "exif", "sha256")
_TEMP = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)\.tmp")

# (file in sklearn's / skimage's data folder, what it shows); all ship with the wheels
_SKLEARN_PHOTOS = {"china.jpg": "a chinese pagoda by a lake", "flower.jpg": "a flower"}
_SKIMAGE_PHOTOS = {"astronaut.png": "an astronaut", "coffee.png": "a cup of coffee",
                   "chelsea.png": "a cat", "rocket.jpg": "a rocket on its launch pad",
                   "motorcycle_left.png": "a motorcycle", "hubble_deep_field.jpg": "galaxies in deep space"}


class _Unreadable(Exception):
    """A source image that cannot be stored; ``reason`` is the skip counter's name."""

    def __init__(self, message: str, reason: str = "unreadable_image"):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# inputs


def find_images(src) -> list[str]:
    """Image files under ``src`` (recursive; jpg/jpeg/png/webp, any case) as posix paths relative
    to ``src``, sorted."""
    root = Path(src)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _norm(rel: str) -> str:
    return PurePosixPath(str(rel).strip().replace("\\", "/")).as_posix()


def read_captions(path, image_col: str = "image", caption_col: str = "caption") -> list[tuple[str, str]]:
    """``(image path relative to src, caption)`` rows of a ``.csv`` or ``.parquet`` file, in file
    order. An empty or null caption is ``""``; parquet needs pyarrow (ImportError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            _check_columns(path, columns, image_col, caption_col)
            rows = [(r[image_col], r[caption_col]) for r in reader]
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading captions from '{path}' needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        _check_columns(path, table.column_names, image_col, caption_col)
        rows = list(zip(table.column(image_col).to_pylist(), table.column(caption_col).to_pylist()))
    else:
        raise ValueError(f"captions file '{path}' must be .csv or .parquet")
    return [(_norm(img or ""), "" if cap is None else str(cap)) for img, cap in rows]


def _check_columns(path, columns, *wanted) -> None:
    for col in wanted:
        if col not in columns:
            raise ValueError(f"captions file '{path}' has no column '{col}' (columns: {', '.join(columns)})")


def _samples(root: Path, captions, image_col: str, caption_col: str, skipped: Counter):
    """The (url, caption) list in sorted url order; counts what cannot be a sample."""
    images = find_images(root)
    if captions is None:
        samples = []
        for rel in images:
            side = (root / rel).with_suffix(".txt")
            if side.is_file():
                samples.append((rel, side.read_text(encoding="utf-8", errors="replace").strip()))
            else:
                samples.append((rel, None))
        return samples
    rows = read_captions(captions, image_col, caption_col)
    samples = [(rel, cap) for rel, cap in rows if (root / rel).is_file()]
    missing = [rel for rel, _ in rows if not (root / rel).is_file()]
    if missing:
        skipped["missing_image"] += len(missing)
        log.warning("%d row(s) of %s name images missing under %s, e.g. %s", len(missing), captions,
                    root, ", ".join(missing[:3]))
    listed = {rel for rel, _ in samples}
    unlisted = sum(rel not in listed for rel in images)
    if unlisted:
        skipped["not_in_caption_file"] += unlisted
    return sorted(samples, key=lambda s: s[0])  # stable: repeated rows keep the file's order


# ---------------------------------------------------------------------------------------------
# one image


def _exif(img) -> str | None:
    """IFD0 EXIF tags as JSON, named like exifread's ``"Image Orientation"``; None if none."""
    from PIL import ExifTags

    try:
        tags = img.getexif()
    except Exception:  # noqa: BLE001 - broken EXIF is not a reason to drop a readable image
        return None
    if not tags:
        return None
    return json.dumps({f"Image {ExifTags.TAGS.get(k, k)}": str(v).strip() for k, v in tags.items()})


def _for_format(img, ext: str):
    """Convert the mode to one ``ext`` stores: JPEG has no alpha (composite on white)."""
    from PIL import Image

    if img.mode not in ("L", "LA", "RGB", "RGBA"):  # P, PA, 1, CMYK, I;16, ...
        alpha = img.mode in ("PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
        img = img.convert("RGBA" if alpha else "RGB")
    if ext == "jpg" and img.mode in ("LA", "RGBA"):
        base = Image.new(img.mode[:-1], img.size, 255)
        base.paste(img, mask=img.getchannel("A"))
        img = base
    if ext == "webp" and img.mode in ("L", "LA"):
        img = img.convert("RGBA" if img.mode == "LA" else "RGB")
    return img


def _encode(data: bytes, resize: int | None, fmt: str, quality: int):
    """Source bytes -> ``(stored bytes, ext, width, height, original_width, original_height,
    exif)``; raises :class:`_Unreadable`."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)  # header only
        ow, oh = img.size
        if ow * oh > MAX_PIXELS:
            raise _Unreadable(f"image of {ow}x{oh} px exceeds MAX_PIXELS={MAX_PIXELS}", "too_large")
        img.load()  # decode now, so truncated files fail here
    except _Unreadable:
        raise
    except Image.DecompressionBombError as e:
        raise _Unreadable(str(e), "too_large") from None
    except Image.UnidentifiedImageError:
        raise _Unreadable("not a png, jpeg or webp image") from None
    except Exception as e:  # noqa: BLE001 - bad bytes are data: PIL raises OSError, SyntaxError, ...
        raise _Unreadable(f"cannot decode image: {e}") from None
    src_ext, exif = _EXT[img.format], _exif(img)
    if resize is not None and min(ow, oh) > resize:
        img = ImageOps.exif_transpose(img)
        w, h = img.size
        s = resize / min(w, h)  # shorter side -> resize, the other keeps the aspect ratio
        size = (resize, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), resize)
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = _for_format(img, "png")
        img = img.resize(size, Image.LANCZOS)
    elif fmt == "keep":
        return data, src_ext, ow, oh, ow, oh, exif  # the source bytes, untouched
    else:
        img = ImageOps.exif_transpose(img)
    ext = src_ext if fmt == "keep" else fmt
    img = _for_format(img, ext)
    buf = io.BytesIO()
    img.save(buf, format=_SAVE[ext], **({} if ext == "png" else {"quality": quality}))
    return buf.getvalue(), ext, img.width, img.height, ow, oh, exif


# ---------------------------------------------------------------------------------------------
# one shard


def _write_parquet(path: Path, rows: list[dict]) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    i32 = ("width", "height", "original_width", "original_height")
    schema = pa.schema([pa.field(k, pa.int32() if k in i32 else pa.string()) for k in _META_FIELDS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return True


def _sample(root: Path, rel: str, caption: str | None, key: str, resize, fmt, quality):
    """``(img2dataset meta, tar sample, None)``, or ``(meta, None, skip reason)`` for an image
    that cannot be stored."""
    meta = dict.fromkeys(_META_FIELDS)
    meta.update(caption=caption or "", url=rel, key=key)
    try:
        img, ext, w, h, ow, oh, exif = _encode((root / rel).read_bytes(), resize, fmt, quality)
    except (_Unreadable, OSError) as e:
        msg = str(e) if isinstance(e, _Unreadable) else f"cannot read file: {e.strerror}"
        meta.update(status="failed_to_resize", error_message=msg)
        return meta, None, getattr(e, "reason", "unreadable_image")
    meta.update(status="success", width=w, height=h, original_width=ow, original_height=oh, exif=exif,
                sha256=hashlib.sha256(img).hexdigest())
    sample = {"__key__": key, ext: img, "txt": meta["caption"].encode("utf-8"),
              "json": json.dumps(meta, indent=4).encode("utf-8")}
    return meta, sample, None


def _write_shard(root: Path, out: Path, shard: int, samples, key_digits: int, resize, fmt, quality,
                 counts: Counter, bar) -> int:
    """Write shard ``shard`` (tar, parquet, stats) under temp names, then rename; returns the
    number of images stored. ``counts`` gets the skip reasons and ``missing_caption`` (a ``None``
    caption: no sidecar) of the stored images."""
    import webdataset as wds

    name = f"{shard:05d}"
    tmp = {s: out / f"{name}{s}.tmp" for s in (".tar", ".parquet", "_stats.json")}
    start, status, rows, successes = time.time(), Counter(), [], 0
    try:
        with open(tmp[".tar"], "wb") as f:
            sink = wds.TarWriter(f, encoder=False, mtime=0.0)
            try:
                for index, (rel, caption) in enumerate(samples):
                    meta, sample, reason = _sample(root, rel, caption, f"{name}{index:0{key_digits}d}",
                                                   resize, fmt, quality)
                    if sample is None:
                        counts[reason] += 1
                        status[meta["error_message"]] += 1
                    else:
                        sink.write(sample)
                        successes += 1
                        status["success"] += 1
                        counts["missing_caption"] += caption is None
                    rows.append(meta)
                    bar.update(1)
            finally:
                sink.close()  # also on error, so the tar stream never writes to a closed file
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp[".tar"], out / f"{name}.tar")
        if _write_parquet(tmp[".parquet"], rows):
            os.replace(tmp[".parquet"], out / f"{name}.parquet")
        end = time.time()
        stats = {"count": len(samples), "successes": successes, "failed_to_download": 0,
                 "failed_to_resize": len(samples) - successes, "duration": end - start,
                 "start_time": start, "end_time": end, "status_dict": dict(status)}
        tmp["_stats.json"].write_text(json.dumps(stats, indent=4))
        os.replace(tmp["_stats.json"], out / f"{name}_stats.json")
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return successes


# ---------------------------------------------------------------------------------------------
# public API


def write_image_shards(src, out_dir, captions=None, shard_size: int = 10000, resize: int | None = None,
                       fmt: str = "keep", quality: int = 95, seed: int | None = 0, progress: bool = True,
                       *, image_col: str = "image", caption_col: str = "caption") -> dict:
    """Write the images under ``src`` (recursive, jpg/jpeg/png/webp) as img2dataset-layout shards.

    Captions come from a ``NAME.txt`` sidecar next to each image (``captions=None``; a missing
    sidecar gives ``""`` and is counted) or from a ``.csv`` / ``.parquet`` file with columns
    ``image_col`` (path relative to ``src``) and ``caption_col``; then the file's rows are the
    samples (a row may repeat an image), and rows naming a missing image are skipped and counted.

    The samples are sorted by path, then permuted by ``seed`` (``None`` keeps the sorted order;
    the loader reads each shard in stored order, so a sorted folder would give one-subfolder
    batches). ``fmt="keep"`` stores the source bytes unless the image is resized, when it is
    re-encoded in its own format; ``"jpg"``, ``"png"``, ``"webp"`` always re-encode
    (``quality`` for jpg/webp). ``resize=N`` downscales (LANCZOS) so the shorter side is ``N``;
    a smaller image is never upscaled. Stale temporary files of an interrupted run are removed;
    other files in ``out_dir`` are left alone.

    Returns ``{"spec": "OUT/{00000..0000K}.tar", "n": images stored, "skipped": {reason: count},
    "missing_caption": stored images that had no sidecar}``; the reasons are ``missing_image``,
    ``not_in_caption_file`` (images under ``src`` that the captions file does not name),
    ``unreadable_image`` and ``too_large`` (over ``decode.MAX_PIXELS``). A skipped image never
    stops the run.
    """
    root, out = Path(src), Path(out_dir)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if resize is not None and resize <= 0:
        raise ValueError(f"resize must be > 0 px, got {resize}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if not root.is_dir():
        raise ValueError(f"image folder '{root}' does not exist")
    skipped: Counter = Counter()
    samples = _samples(root, captions, image_col, caption_col, skipped)
    if not samples:
        raise ValueError(f"no images to write: none of {', '.join(IMAGE_SUFFIXES)} under '{root}'"
                         + (f" named in '{captions}'" if captions is not None else ""))
    if seed is not None:
        samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]

    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if _TEMP.fullmatch(p.name):
            p.unlink()
    key_digits = max(4, math.ceil(math.log10(shard_size)))
    num_shards = -(-len(samples) // shard_size)
    n = 0
    with tqdm(total=len(samples), desc="shards", unit="img", disable=not progress) as bar:
        for s in range(num_shards):
            n += _write_shard(root, out, s, samples[s * shard_size:(s + 1) * shard_size], key_digits,
                              resize, fmt, quality, skipped, bar)
    missing_caption = skipped.pop("missing_caption", 0)
    if skipped or missing_caption:
        log.warning("skipped %s; %d stored image(s) had no caption sidecar", dict(skipped), missing_caption)
    return {"spec": f"{out}/{{00000..{num_shards - 1:05d}}}.tar", "n": n, "skipped": dict(skipped),
            "missing_caption": missing_caption}


def sample_photo_folder(out_dir, n: int = 64, size_range: tuple[int, int] = (200, 500), seed: int = 0) -> Path:
    """A folder of ``n`` realistic photos with caption sidecars; returns ``Path(out_dir)``.

    Random crops (each side drawn from ``size_range``, clipped to the photo) of the photos that
    ship with scikit-learn (china, flower) and, when scikit-image is installed, those of its
    photos that ship in the wheel (astronaut, coffee, chelsea, rocket, ...; nothing is
    downloaded), saved as JPEG at a random quality in [80, 95] to ``OUT/<photo>/<photo>_0017.jpg``
    with ``<photo>_0017.txt`` = ``"a photo of a flower, crop 17"``. Deterministic in ``seed``.
    """
    from PIL import Image

    lo, hi = size_range
    if n <= 0 or not 0 < lo <= hi:
        raise ValueError(f"need n > 0 and 0 < size_range[0] <= size_range[1], got n={n}, {size_range}")
    photos = _source_photos()
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    for i in range(n):
        name, what, pixels = photos[i % len(photos)]
        H, W = pixels.shape[:2]
        ch, cw = min(int(rng.integers(lo, hi + 1)), H), min(int(rng.integers(lo, hi + 1)), W)
        y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[y:y + ch, x:x + cw]).save(folder / f"{name}_{i:04d}.jpg", format="JPEG",
                                                         quality=int(rng.integers(80, 96)))
        (folder / f"{name}_{i:04d}.txt").write_text(f"a photo of {what}, crop {i}\n", encoding="utf-8")
    return out


def _source_photos() -> list[tuple[str, str, np.ndarray]]:
    """``(name, what it shows, HxWx3 uint8)`` for each shipped photo found."""
    import importlib.util

    from PIL import Image
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = [(Path(f).stem, _SKLEARN_PHOTOS[Path(f).name], img)
              for f, img in zip(bunch.filenames, bunch.images) if Path(f).name in _SKLEARN_PHOTOS]
    spec = importlib.util.find_spec("skimage")  # locate, do not import: the files are read directly
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        for fname, what in _SKIMAGE_PHOTOS.items():
            if (data / fname).is_file():
                with Image.open(data / fname) as im:
                    photos.append((Path(fname).stem, what, np.asarray(im.convert("RGB"))))
    return photos


# ---------------------------------------------------------------------------------------------
# command line (``difftrain data shards``)


def add_shards_args(parser) -> None:
    """Add the ``shards`` arguments to an argparse (sub)parser; pair with :func:`run_shards`."""
    parser.add_argument("src", help="image folder, searched recursively for jpg/jpeg/png/webp")
    parser.add_argument("--out", required=True, help="output folder for 00000.tar, 00000_stats.json, ...")
    parser.add_argument("--captions", help="CSV or parquet with image (relative to src) and caption "
                                           "columns; default: a NAME.txt sidecar next to each image")
    parser.add_argument("--image-col", default="image", help="image column of --captions")
    parser.add_argument("--caption-col", default="caption", help="caption column of --captions")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    parser.add_argument("--resize", type=int, help="downscale so the shorter side is this many px")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="keep",
                        help="keep: store the source bytes unless resized; else re-encode")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality when re-encoding")
    parser.add_argument("--seed", type=int, default=0, help="permutation of the sorted images")


def run_shards(args) -> dict:
    """Run :func:`write_image_shards` from parsed :func:`add_shards_args` arguments; prints and
    returns its result. Bad arguments raise :class:`~difftrain.config.ConfigError` (one line)."""
    from difftrain.config import ConfigError

    try:
        info = write_image_shards(args.src, args.out, captions=args.captions, shard_size=args.shard_size,
                                  resize=args.resize, fmt=args.fmt, quality=args.quality, seed=args.seed,
                                  image_col=args.image_col, caption_col=args.caption_col)
    except (ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    print(json.dumps(info, indent=1))
    return info
