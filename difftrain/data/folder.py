"""An image folder as samples for ``difftrain data shards`` (docs/DATA.md): its images, their control images and
their captions. Images are jpg/jpeg/png/webp files anywhere under the folder; the caption of ``sub/x.jpg`` is
``sub/x.txt`` beside it, else its row in a caption table (:data:`CAPTION_TABLES`: Hugging Face imagefolder's
``metadata.jsonl`` / ``metadata.csv``, or ``captions.csv``; paths relative to the table's own folder), or every row
of a ``--captions`` file; the control image of ``sub/x.jpg`` is ``sub/x.control.EXT`` beside it, else
``control/sub/x.EXT``. :mod:`difftrain.data.writers` turns the samples into shards."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from difftrain.data.decode import IMAGE_EXTS

IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS)
CONTROL_SUFFIX = ".control"  # sub/x.control.png is the control image of sub/x.jpg
CONTROL_DIR = "control"  # ... and so is control/sub/x.png
CAPTION_TABLES = ("metadata.jsonl", "metadata.csv", "captions.csv")
TABLE_IMAGE_COLS = ("file_name", "image")  # Hugging Face imagefolder's name first, then --captions' default
TABLE_CAPTION_COLS = ("text", "caption")


def warn(text: str) -> None:
    """One ``difftrain: warning:`` line on stderr, above the progress bar."""
    tqdm.write(f"difftrain: warning: {text}", file=sys.stderr)


def _image_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _control_of(rel: str) -> str | None:
    """The image a control file belongs to, as its path without extension (``sub/x.control.png`` and
    ``control/sub/x.png`` -> ``sub/x``); None for an image that is not a control."""
    p = PurePosixPath(rel)
    if p.stem.lower().endswith(CONTROL_SUFFIX):
        return (p.parent / p.stem[:-len(CONTROL_SUFFIX)]).as_posix()
    if p.parts[0] == CONTROL_DIR and len(p.parts) > 1:
        return PurePosixPath(*p.parts[1:]).with_suffix("").as_posix()
    return None


def find_images(src) -> list[str]:
    """Image files under ``src`` (recursive; jpg/jpeg/png/webp, any case) as posix paths relative
    to ``src``, sorted; control images (:func:`find_controls`) are not among them."""
    return [rel for rel in _image_files(Path(src)) if _control_of(rel) is None]


def find_controls(src) -> dict[str, str]:
    """``{image path without extension: control image path}`` under ``src``: ``sub/x.control.EXT``
    beside the image, else ``control/sub/x.EXT``; among several candidates the first in sorted order."""
    return _controls(_image_files(Path(src)))


def _controls(files: list[str]) -> dict[str, str]:
    beside, folder = {}, {}
    for rel in files:
        stem = _control_of(rel)
        if stem is not None:
            side = PurePosixPath(rel).stem.lower().endswith(CONTROL_SUFFIX)
            (beside if side else folder).setdefault(stem, rel)
    return {**folder, **beside}


def _stem(rel: str) -> str:
    return PurePosixPath(rel).with_suffix("").as_posix()


def _norm(rel: str) -> str:
    return PurePosixPath(str(rel).strip().replace("\\", "/")).as_posix()


def read_captions(path, image_col="image", caption_col="caption") -> list[tuple[str, str]]:
    """``(image path relative to src, caption)`` rows of a ``.csv``, ``.jsonl`` (one JSON object a
    line) or ``.parquet`` file, in file order. A column argument may be a tuple of names, the first
    present is used. An empty or null caption is ``""``; parquet needs pyarrow (ImportError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            where = f"captions file '{path}'"
            icol, ccol = _column(where, columns, image_col), _column(where, columns, caption_col)
            rows = [(r[icol], r[ccol]) for r in reader]
    elif suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"captions file '{path}' line {n} is not JSON: {e}") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"captions file '{path}' line {n} is not a JSON object")
                where = f"captions file '{path}' line {n}"
                rows.append((rec[_column(where, list(rec), image_col)], rec[_column(where, list(rec), caption_col)]))
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading captions from '{path}' needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        where, columns = f"captions file '{path}'", table.column_names
        icol, ccol = _column(where, columns, image_col), _column(where, columns, caption_col)
        rows = list(zip(table.column(icol).to_pylist(), table.column(ccol).to_pylist()))
    else:
        raise ValueError(f"captions file '{path}' must be .csv, .jsonl or .parquet")
    return [(_norm(img or ""), "" if cap is None else str(cap)) for img, cap in rows]


def _column(where: str, columns, wanted) -> str:
    names = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    for col in names:
        if col in columns:
            return col
    raise ValueError(f"{where} has no column {' or '.join(repr(c) for c in names)} "
                     f"(columns: {', '.join(map(str, columns))})")


def _folder_captions(root: Path, skipped: Counter) -> dict[str, str]:
    """``{image path: caption}`` from the caption tables (:data:`CAPTION_TABLES`) anywhere under
    ``root``, each naming images relative to its own folder; an image named twice is an error."""
    found: dict[str, tuple[str, str]] = {}
    tables = sorted(p for p in root.rglob("*") if p.name in CAPTION_TABLES and p.is_file())
    for table in tables:
        where = table.relative_to(root).as_posix()
        base = table.parent.relative_to(root)
        for rel, cap in read_captions(table, TABLE_IMAGE_COLS, TABLE_CAPTION_COLS):
            rel = _norm((base / rel).as_posix())
            if rel in found:
                raise ValueError(f"image '{rel}' has two captions, in '{found[rel][1]}' and '{where}'")
            found[rel] = (cap, where)
    missing = sorted(rel for rel in found if not (root / rel).is_file())
    if missing:
        skipped["missing_image"] += len(missing)
        warn(f"{len(missing)} caption row(s) name images missing under '{root}', e.g. {', '.join(missing[:3])}")
    return {rel: cap for rel, (cap, _) in found.items()}


def folder_samples(root: Path, captions, image_col: str, caption_col: str, skipped: Counter):
    """The (url, caption, control url) list in sorted url order; counts what cannot be a sample.
    The caption is None when the image has none."""
    files = _image_files(root)  # one walk of the folder for images and controls
    images, controls = [rel for rel in files if _control_of(rel) is None], _controls(files)
    orphans = sorted(set(controls) - {_stem(rel) for rel in images})
    if orphans:
        skipped["control_without_image"] += len(orphans)
        warn(f"{len(orphans)} control image(s) have no image beside them, e.g. "
              + ", ".join(controls[s] for s in orphans[:3]))
    if captions is None:
        table = _folder_captions(root, skipped)
        samples = []
        for rel in images:
            side = (root / rel).with_suffix(".txt")
            cap = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else table.get(rel)
            samples.append((rel, cap, controls.get(_stem(rel))))
        return samples
    rows = read_captions(captions, image_col, caption_col)
    samples = [(rel, cap, controls.get(_stem(rel))) for rel, cap in rows if (root / rel).is_file()]
    missing = [rel for rel, _ in rows if not (root / rel).is_file()]
    if missing:
        skipped["missing_image"] += len(missing)
        warn(f"{len(missing)} row(s) of {captions} name images missing under {root}, e.g. {', '.join(missing[:3])}")
    listed = {rel for rel, _, _ in samples}
    unlisted = sum(rel not in listed for rel in images)
    if unlisted:
        skipped["not_in_caption_file"] += unlisted
    return sorted(samples, key=lambda s: s[0])  # stable: repeated rows keep the file's order
