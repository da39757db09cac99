"""Reading webdataset tar shards as raw samples, with positions to resume from and to fetch again.

A *raw sample* is ``{"__key__", "__url__", "__index__", "__offset__", member: bytes, ...}``:
``__index__`` is its ordinal in the shard and ``__offset__`` the byte offset of its first tar
header. ``(__index__, __offset__)`` is a *pointer*: :func:`read_shard` resumes at one and
:func:`fetch` reads one sample again, by seeking when the shard is a plain local file (the common
case on cluster file systems) and otherwise by streaming the shard up to it.

**Keys with dots.** webdataset splits a file name at the first dot of its base name, so a key such
as ``img.v2.0001`` falls apart into members of other keys. Here a member's candidate key is its
name without the last extension (``img.v2.0001.jpg`` -> ``img.v2.0001``), and adjacent members are
one sample when their candidate keys are equal or one is the other plus ``.suffix``: the suffix
then belongs to the member name, so webdataset's multi-part members (``000.seg.png`` beside
``000.jpg`` -> key ``000``, member ``seg.png``) still work in either order. The one ambiguity left:
a sample keyed ``a`` directly followed by one keyed ``a.x`` reads as one sample.

Opening uses ``webdataset.gopen``, so ``pipe:cmd`` and http(s) URLs work. A shard that cannot be
opened raises :class:`ShardError` (reason ``shard_unreadable``); a tar that breaks off mid-stream
yields the complete samples before the break and then raises :class:`ShardError` (reason
``shard_truncated``). Nothing here decodes a member.
"""
from __future__ import annotations

from typing import Callable, Iterator

END = -1  # next-offset of the last sample: the shard is finished


class ShardError(Exception):
    """A shard that cannot be (fully) read; ``reason`` is the loader's counter name."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def local_path(url: str) -> str | None:
    """The file path of a plain local, seekable tar (``file:`` prefix allowed); None otherwise."""
    path = url[5:] if url.startswith("file:") else url
    if "://" in path or path.startswith("pipe:") or path.endswith((".gz", ".tgz", ".zst", ".bz2", ".xz")):
        return None
    return path


def _open(url: str, offset: int):
    try:
        path = local_path(url)
        if path is not None:
            f = open(path, "rb")
            if offset:
                f.seek(offset)
            return f, offset
        from webdataset.gopen import gopen

        return gopen(url, "rb"), 0
    except Exception as e:  # missing file, failing pipe command, network error
        raise ShardError(f"cannot open shard {url}: {e}", "shard_unreadable") from e


def _split(name: str) -> tuple[str, str]:
    """Member path -> (candidate key, last extension)."""
    slash = name.rfind("/") + 1
    dot = name.rfind(".")
    if dot < slash:
        return name, ""
    return name[:dot], name[dot + 1:]


class _Broken(Exception):
    pass


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        i += n
    return out


def _members(f, base: int) -> Iterator[tuple[int, str, Callable[[], bytes]]]:
    """``(header_offset, name, read_data)`` of each regular file in a tar stream (call ``read_data()``
    once before the next step, so a sample can be closed when the next one's header appears): ustar, GNU long names
    and pax headers (``path``, ``size``). Python's ``tarfile`` costs ~20x more per member; this
    reads only what webdataset shards use. Raises ``_Broken`` on a bad checksum, a short read or a
    missing end-of-archive marker."""
    pos, pending = base, {}
    while True:
        hdr = f.read(512)
        if len(hdr) < 512:
            raise _Broken(f"no end-of-archive marker after byte {pos}" if not hdr else f"header cut short at byte {pos}")
        if hdr == b"\0" * 512:
            return
        chk = hdr[148:156]
        if _octal(chk) != sum(hdr) - sum(chk) + 256:  # the checksum field counts as 8 spaces
            raise _Broken(f"bad tar header checksum at byte {pos}")
        size = _octal(hdr[124:136])
        kind = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345:346] != b"\0":
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        size = int(pending.get("size", size))
        padded = (size + 511) // 512 * 512

        def data(size=size, padded=padded, at=pos + 512) -> bytes:
            block = f.read(padded)
            if len(block) < padded:
                raise _Broken(f"member data cut short at byte {at}")
            return block[:size]

        if kind in (b"x", b"L", b"g"):  # extended header: applies to the next member
            if kind == b"x":
                pending.update(_pax(data()))
            elif kind == b"L":
                pending["path"] = data().split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                data()
            pending.setdefault("start", pos)  # the member's pointer is its first header
            pos += 512 + padded
            continue
        start = pending.get("start", pos)
        path = pending.get("path") or name.decode("utf-8", "replace")
        pending = {}
        pos += 512 + padded
        if kind in (b"0", b"\0", b"7"):
            yield start, path, data  # read it before the next header
        else:
            data()


def read_shard(url: str, start_index: int = 0, start_offset: int = 0) -> Iterator[tuple[dict, int]]:
    """Yield ``(raw_sample, next_offset)`` from the sample at ``(start_index, start_offset)`` on.

    ``next_offset`` is where the following sample starts (:data:`END` after the last one), so
    ``(sample["__index__"] + 1, next_offset)`` is the pointer to resume after ``raw_sample``.
    A seekable shard starts reading at ``start_offset``; any other streams from its beginning and
    skips ``start_index`` samples without decoding them.
    """
    seek = start_offset if local_path(url) is not None else 0
    f, base = _open(url, seek)
    index = start_index if seek else 0
    cur: dict | None = None
    try:
        try:
            for offset, name, data in _members(f, base):
                key, ext = _split(name)
                if cur is not None:
                    ck = cur["__key__"]
                    if key == ck or key.startswith(ck + "."):
                        cur[(key[len(ck) + 1:] + "." if key != ck else "") + ext] = data()
                        continue
                    if ck.startswith(key + "."):  # the multi-part member came first
                        prefix = ck[len(key) + 1:] + "."
                        members = {(m if m.startswith("__") else prefix + m): v for m, v in cur.items()}
                        cur = {**members, "__key__": key, ext: data()}
                        continue
                    if cur["__index__"] >= start_index:  # complete: the next sample's header is here
                        yield cur, offset
                    index += 1
                cur = {"__key__": key, "__url__": url, "__index__": index, "__offset__": offset, ext: data()}
        except (_Broken, EOFError, OSError, ValueError) as e:
            # the sample being read when the tar broke off is incomplete: dropped
            raise ShardError(f"shard {url} is truncated or corrupt after sample {index}: {e}",
                             "shard_truncated") from e
        if cur is not None and cur["__index__"] >= start_index:
            yield cur, END
    finally:
        f.close()


def fetch(pointers: list[tuple[str, int, int]]) -> list[dict]:
    """Read the samples at ``(url, index, offset)`` pointers again, in the given order.

    Seekable shards seek to each offset; others are streamed once per shard up to the last
    pointer in it. A sample that cannot be read again raises :class:`ShardError`."""
    by_url: dict[str, list[int]] = {}
    for i, (url, _, _) in enumerate(pointers):
        by_url.setdefault(url, []).append(i)
    out: list[dict | None] = [None] * len(pointers)
    for url, idxs in by_url.items():
        if local_path(url) is not None:
            for i in idxs:
                _, index, offset = pointers[i]
                for raw, _ in read_shard(url, index, offset):
                    out[i] = raw
                    break
        else:
            want = {pointers[i][1]: i for i in idxs}
            for raw, _ in read_shard(url):
                if raw["__index__"] in want:
                    out[want.pop(raw["__index__"])] = raw
                    if not want:
                        break
    missing = [pointers[i] for i, r in enumerate(out) if r is None]
    if missing:
        raise ShardError(f"cannot read back buffered sample(s) {missing[:3]}", "shard_unreadable")
    return out  # type: ignore[return-value]
