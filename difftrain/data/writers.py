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

**A folder to fine-tune on** (``difftrain data shards``, docs/DATA.md). Images anywhere under ``src``;
the caption of ``sub/x.jpg`` is ``sub/x.txt`` beside it, else its row in a caption table in the folder
(``metadata.jsonl`` / ``metadata.csv`` as Hugging Face's imagefolder reads them, ``{"file_name", "text"}``
with paths relative to the table's own folder, or ``captions.csv`` with ``image``/``file_name`` and
``caption``/``text`` columns), else ``""`` (counted: ``missing_caption``). An optional control image
(ControlNet's condition) is ``sub/x.control.png`` (any image extension) or ``control/sub/x.png`` (the
top-level ``control/`` folder is reserved for them); it is stored as the sample's ``control.png``
member (its JSON names it as ``control_url``), through the same orientation, resize and crop as its
image, and must have the image's size. An empty caption writes no ``txt`` member (the loader skips a
zero-byte member as ``empty_member``; the JSON's ``caption`` is ``""``).
``image_size=N`` stores every image as N x N: the centred square of the source, resized (up or down,
LANCZOS), which is the loader's ``data.crop=center`` done once; without it, sizes are kept (or only
downscaled by ``resize``) and the loader crops at training time. ``num_val`` / ``val_fraction``
split off a held-out set: ``out/train/`` and ``out/val/`` (the first samples of the seeded order), as
``difftrain data demo`` writes them. A non-empty ``out_dir`` is refused unless ``overwrite``, which
replaces the shard files there (nothing else) so no stale shard of an earlier run stays beside the new.

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
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from difftrain.data.decode import MAX_PIXELS
from difftrain.data.folder import IMAGE_SUFFIXES, folder_samples, warn

FORMATS = ("keep", "jpg", "png", "webp")
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # what the loader's whitelist decodes; nothing else is read
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SAVE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_META_FIELDS = ("caption", "url", "key", "status", "error_message", "width", "height",
                "original_width", "original_height", "exif", "sha256")
_TEMP = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)\.tmp")
_OURS = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)(\.tmp)?")  # what ``overwrite`` replaces
_SPLITS = ("train", "val")
_NAMED = 20  # skipped images named one warning line each; the rest are only counted

CONTROL_MEMBER = "control.png"  # KEY.control.png: ControlNet's condition image

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


def _decode(data: bytes):
    """Source bytes -> fully loaded PIL image (PNG, JPEG or WEBP only); raises :class:`_Unreadable`."""
    from PIL import Image

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
    return img


def _fit(img, resize: int | None, square: int | None):
    """An upright image as stored: the centred square resized to ``square`` px (up or down), or the
    shorter side downscaled to ``resize`` px, or unchanged. An image and its control go through the
    same call, so they stay aligned pixel for pixel."""
    from PIL import Image

    w, h = img.size
    if square is not None:
        s = min(w, h)
        size, box = (square, square), ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    elif resize is not None and min(w, h) > resize:
        s = resize / min(w, h)  # shorter side -> resize, the other keeps the aspect ratio
        size, box = ((resize, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), resize)), None
    else:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = _for_format(img, "png")
    return img.resize(size, Image.LANCZOS, box=box)


def _encode(data: bytes, resize: int | None, fmt: str, quality: int, square: int | None = None,
            control: bytes | None = None):
    """Source bytes (and its control image's) -> ``(stored bytes, ext, width, height, original_width,
    original_height, exif, control png or None)``; raises :class:`_Unreadable`."""
    from PIL import ImageOps

    img = _decode(data)
    ow, oh = img.size
    src_ext, exif = _EXT[img.format], _exif(img)
    keep = fmt == "keep" and square is None and (resize is None or min(ow, oh) <= resize)
    if not keep:
        img = ImageOps.exif_transpose(img)
    ctrl = None if control is None else _control_png(control, img.size, not keep, resize, square)
    if keep:
        return data, src_ext, ow, oh, ow, oh, exif, ctrl  # the source bytes, untouched
    img = _fit(img, resize, square)
    ext = src_ext if fmt == "keep" else fmt
    img = _for_format(img, ext)
    buf = io.BytesIO()
    img.save(buf, format=_SAVE[ext], **({} if ext == "png" else {"quality": quality}))
    return buf.getvalue(), ext, img.width, img.height, ow, oh, exif, ctrl


def _control_png(data: bytes, size: tuple[int, int], upright: bool, resize, square) -> bytes:
    """A control image as its sample's 8-bit PNG (L for gray sources, else RGB: the loader's
    :func:`~difftrain.data.images.to_mode`), turned and fitted as its image was (``size``: the
    image's size before fitting); raises :class:`_Unreadable` when it cannot be read or does not
    have its image's size."""
    from PIL import ImageOps

    from difftrain.data.images import to_mode

    try:
        c = _decode(data)
    except _Unreadable as e:
        raise _Unreadable(str(e), "unreadable_control") from None
    if upright:
        c = ImageOps.exif_transpose(c)
    if c.size != size:
        raise _Unreadable(f"{c.width}x{c.height} px, its image is {size[0]}x{size[1]} px", "control_size_mismatch")
    c = to_mode(c, 1 if c.mode in ("1", "L", "LA", "I", "F") or c.mode.startswith("I;16") else 3)
    if upright:
        c = _fit(c, resize, square)
    buf = io.BytesIO()
    c.save(buf, format="PNG")
    return buf.getvalue()


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


def _sample(root: Path, rel: str, caption: str | None, control: str | None, key: str, enc: tuple):
    """``(img2dataset meta, tar sample, None)``, or ``(meta, None, skip reason)`` for an image (or its
    control image) that cannot be stored. ``enc`` is ``(resize, fmt, quality, square)``."""
    resize, fmt, quality, square = enc
    meta = dict.fromkeys(_META_FIELDS)
    meta.update(caption=caption or "", url=rel, key=key)
    try:
        data = (root / rel).read_bytes()
        try:
            ctrl = None if control is None else (root / control).read_bytes()
        except OSError as e:
            raise _Unreadable(f"cannot read file: {e.strerror}", "unreadable_control") from None
        img, ext, w, h, ow, oh, exif, ctrl = _encode(data, resize, fmt, quality, square, ctrl)
    except (_Unreadable, OSError) as e:
        msg = str(e) if isinstance(e, _Unreadable) else f"cannot read file: {e.strerror}"
        reason = getattr(e, "reason", "unreadable_image")
        if reason in ("unreadable_control", "control_size_mismatch"):
            msg = f"control image '{control}': {msg}"
        meta.update(status="failed_to_resize", error_message=msg)
        return meta, None, reason
    meta.update(status="success", width=w, height=h, original_width=ow, original_height=oh, exif=exif,
                sha256=hashlib.sha256(img).hexdigest())
    sample = {"__key__": key, ext: img}
    if meta["caption"]:  # no zero-byte txt for an uncaptioned image: the loader skips those (empty_member)
        sample["txt"] = meta["caption"].encode("utf-8")
    if ctrl is not None:
        meta["control_url"] = control  # after img2dataset's fields; the parquet keeps only those
        sample[CONTROL_MEMBER] = ctrl
    sample["json"] = json.dumps(meta, indent=4).encode("utf-8")
    return meta, sample, None


def _write_shard(root: Path, out: Path, shard: int, samples, key_digits: int, enc: tuple, counts: Counter,
                 bar, skip) -> int:
    """Write shard ``shard`` (tar, parquet, stats) under temp names, then rename; returns the
    number of images stored. ``counts`` gets the skip reasons, ``missing_caption`` (stored without
    a caption) and ``with_control``; ``skip(url, message)`` is told of each skipped image."""
    import webdataset as wds

    name = f"{shard:05d}"
    tmp = {s: out / f"{name}{s}.tmp" for s in (".tar", ".parquet", "_stats.json")}
    start, status, rows, successes = time.time(), Counter(), [], 0
    try:
        with open(tmp[".tar"], "wb") as f:
            sink = wds.TarWriter(f, encoder=False, mtime=0.0)
            try:
                for index, (rel, caption, control) in enumerate(samples):
                    meta, sample, reason = _sample(root, rel, caption, control, f"{name}{index:0{key_digits}d}", enc)
                    if sample is None:
                        counts[reason] += 1
                        status[meta["error_message"]] += 1
                        skip(rel, meta["error_message"])
                    else:
                        sink.write(sample)
                        successes += 1
                        status["success"] += 1
                        counts["missing_caption"] += not caption
                        counts["with_control"] += CONTROL_MEMBER in sample
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


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output '{out}' is a file, not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"output folder '{out}' is not empty; --overwrite (overwrite=True) replaces the shards in it")


def _clear(out: Path, overwrite: bool) -> None:
    """Remove the temporary files of an interrupted run and, with ``overwrite``, every shard file
    (``00000.tar``, ``_stats.json``, ``.parquet``) in ``out``, ``out/train`` and ``out/val``."""
    for folder in (out,) + tuple(out / s for s in _SPLITS):
        if folder.is_dir():
            for p in folder.iterdir():
                if (_OURS if overwrite else _TEMP).fullmatch(p.name) and p.is_file():
                    p.unlink()


def _write_set(root: Path, out: Path, samples: list, shard_size: int, enc: tuple, counts: Counter, bar,
               skip) -> tuple[str, int]:
    """Write ``samples`` as shards ``out/00000.tar, ...``; returns (brace spec, images stored)."""
    out.mkdir(parents=True, exist_ok=True)
    key_digits = max(4, math.ceil(math.log10(shard_size)))
    num_shards = -(-len(samples) // shard_size)
    n = 0
    for s in range(num_shards):
        n += _write_shard(root, out, s, samples[s * shard_size:(s + 1) * shard_size], key_digits, enc, counts,
                          bar, skip)
    return f"{out}/{{00000..{num_shards - 1:05d}}}.tar", n


# ---------------------------------------------------------------------------------------------
# public API


def write_image_shards(src, out_dir, captions=None, shard_size: int = 10000, resize: int | None = None,
                       fmt: str = "keep", quality: int = 95, seed: int | None = 0, progress: bool = True,
                       *, image_col: str = "image", caption_col: str = "caption", image_size: int | None = None,
                       num_val: int = 0, val_fraction: float = 0.0, overwrite: bool = False) -> dict:
    """Write the images under ``src`` (recursive, jpg/jpeg/png/webp) as img2dataset-layout shards.

    Captions come from a ``NAME.txt`` sidecar next to each image, else from a caption table in the
    folder (:data:`difftrain.data.folder.CAPTION_TABLES`; ``captions=None``; an image with neither gets ``""`` and is
    counted), or from a ``.csv`` / ``.jsonl`` / ``.parquet`` file with columns ``image_col`` (path
    relative to ``src``) and ``caption_col``; then the file's rows are the samples (a row may repeat
    an image), and rows naming a missing image are skipped and counted. A control image
    (:func:`difftrain.data.folder.find_controls`) becomes the sample's ``control.png`` member.

    The samples are sorted by path, then permuted by ``seed`` (``None`` keeps the sorted order;
    the loader reads each shard in stored order, so a sorted folder would give one-subfolder
    batches). ``fmt="keep"`` stores the source bytes unless the image is resized, when it is
    re-encoded in its own format; ``"jpg"``, ``"png"``, ``"webp"`` always re-encode
    (``quality`` for jpg/webp). ``resize=N`` downscales (LANCZOS) so the shorter side is ``N``;
    a smaller image is never upscaled. ``image_size=N`` (instead) stores the centred square at N x N.
    ``num_val`` samples (or ``round(val_fraction * samples)``, at least 1) of the seeded order go to
    ``out/val``, the rest to ``out/train``; without either, the shards are ``out/00000.tar, ...``.
    A non-empty ``out_dir`` is refused unless ``overwrite``; then its shard files are replaced and
    other files left alone. Each skipped image is named in a warning (the first 20).

    Returns ``{"spec": "OUT/{00000..0000K}.tar", "n": images stored, "skipped": {reason: count},
    "missing_caption": stored images without a caption, "with_control": stored with a control image}``;
    with a held-out set ``"train"`` and ``"val"`` (specs) and ``"num_train"``, ``"num_val"`` (stored)
    replace ``"spec"``. The reasons are ``missing_image``, ``not_in_caption_file`` (images under
    ``src`` that the captions file does not name), ``unreadable_image``, ``too_large`` (over
    ``decode.MAX_PIXELS``), ``unreadable_control``, ``control_size_mismatch`` and
    ``control_without_image``. A skipped image never stops the run.
    """
    root, out = Path(src), Path(out_dir)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    if resize is not None and resize <= 0:
        raise ValueError(f"resize must be > 0 px, got {resize}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be > 0 px, got {image_size}")
    if resize is not None and image_size is not None:
        raise ValueError("give resize (shorter side) or image_size (square crop), not both")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if num_val < 0 or not 0.0 <= val_fraction < 1.0 or (num_val and val_fraction):
        raise ValueError(f"give num_val >= 0 or val_fraction in [0, 1), not both; got {num_val}, {val_fraction}")
    if not root.is_dir():
        raise ValueError(f"image folder '{root}' does not exist")
    _check_out(out, overwrite)
    skipped: Counter = Counter()
    samples = folder_samples(root, captions, image_col, caption_col, skipped)
    if not samples:
        raise ValueError(f"no images to write: none of {', '.join(IMAGE_SUFFIXES)} under '{root}'"
                         + (f" named in '{captions}'" if captions is not None else ""))
    if seed is not None:
        samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]
    k = num_val or (max(1, round(val_fraction * len(samples))) if val_fraction else 0)
    if k >= len(samples):
        raise ValueError(f"a held-out set of {k} leaves no training sample: '{root}' has {len(samples)}")

    out.mkdir(parents=True, exist_ok=True)
    _clear(out, overwrite)
    named: list[str] = []

    def skip(url: str, message: str) -> None:
        if len(named) < _NAMED:
            warn(f"skipped '{url}': {message}")
        named.append(url)

    enc = (resize, fmt, quality, image_size)
    with tqdm(total=len(samples), desc="shards", unit="img", disable=not progress) as bar:
        if k:
            val, num_val = _write_set(root, out / "val", samples[:k], shard_size, enc, skipped, bar, skip)
            train, num_train = _write_set(root, out / "train", samples[k:], shard_size, enc, skipped, bar, skip)
            info = {"train": train, "val": val, "num_train": num_train, "num_val": num_val, "n": num_train + num_val}
        else:
            spec, n = _write_set(root, out, samples, shard_size, enc, skipped, bar, skip)
            info = {"spec": spec, "n": n}
    missing_caption = skipped.pop("missing_caption", 0)
    with_control = skipped.pop("with_control", 0)
    if skipped or missing_caption:
        more = f" ({len(named) - _NAMED} more not named above)" if len(named) > _NAMED else ""
        warn(f"skipped {sum(skipped.values())} ({', '.join(f'{r}: {c}' for r, c in sorted(skipped.items()))})"
              f"{more}; {missing_caption} image(s) stored without a caption")
    return {**info, "skipped": dict(skipped), "missing_caption": missing_caption, "with_control": with_control}


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
    parser.add_argument("src", help="image folder, searched recursively for jpg/jpeg/png/webp; captions from "
                                    "NAME.txt sidecars or a metadata.jsonl / captions.csv in it; control images "
                                    "NAME.control.png or control/NAME.png (docs/DATA.md)")
    parser.add_argument("--out", required=True, help="output folder for 00000.tar, 00000_stats.json, ... "
                                                     "(train/ and val/ with --val or --val-frac)")
    parser.add_argument("--captions", help="CSV, JSONL or parquet with image (relative to src) and caption "
                                           "columns; its rows are the samples")
    parser.add_argument("--image-col", default="image", help="image column of --captions")
    parser.add_argument("--caption-col", default="caption", help="caption column of --captions")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, metavar="N", help="store the centred square, resized to N x N px")
    size.add_argument("--resize", type=int, metavar="N", help="downscale so the shorter side is this many px")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="keep",
                        help="keep: store the source bytes unless resized; else re-encode")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality when re-encoding")
    parser.add_argument("--seed", type=int, default=0, help="permutation of the sorted images")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val", dest="num_val", type=int, default=0, metavar="N", help="hold out N samples as out/val")
    val.add_argument("--val-frac", dest="val_fraction", type=float, default=0.0, metavar="F",
                     help="hold out this fraction of the samples as out/val")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")


def run_shards(args) -> dict:
    """Run :func:`write_image_shards` from parsed :func:`add_shards_args` arguments; prints and
    returns its result. Bad arguments raise :class:`~difftrain.config.ConfigError` (one line)."""
    from difftrain.config import ConfigError

    try:
        info = write_image_shards(args.src, args.out, captions=args.captions, shard_size=args.shard_size,
                                  resize=args.resize, fmt=args.fmt, quality=args.quality, seed=args.seed,
                                  image_col=args.image_col, caption_col=args.caption_col,
                                  image_size=args.image_size, num_val=args.num_val,
                                  val_fraction=args.val_fraction, overwrite=args.overwrite)
    except (ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    print(json.dumps(info, indent=1))
    return info
