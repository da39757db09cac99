"""Shard specs: which tars a run reads, grouped into weighted sources.

``data.train`` is one of

* a brace pattern: ``/data/laion/{00000..12345}.tar`` (one source);
* a list of patterns: each is a source, mixed in proportion to its number of shards (so with
  equal-sized shards, as img2dataset writes them, the mix equals concatenation);
* a list of mappings ``{shards: PATTERN or [PATTERNS], weight: W, name: N}``: a source per
  entry, mixed per sample with probability proportional to ``weight``.

URLs are whatever ``webdataset.gopen`` opens: paths, ``file:``, ``pipe:CMD`` (object stores:
``pipe:aws s3 cp s3://bucket/{000..099}.tar -``), ``http(s)://``.

**Checked up front.** :func:`check_local` refuses a spec naming a local shard (a path or ``file:``) that
does not exist, before any process starts (config validation, ``ShardLoader``). ``pipe:`` and
``http(s)://`` URLs cannot be checked without reading them: a shard that fails there is skipped and
counted when it is read, and ``data.max_skip_rate`` ends the run when most fail (``loader.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    urls: tuple[str, ...]
    weight: float


def _expand(pattern, key: str) -> list[str]:
    from braceexpand import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"config key '{key}': shards must be a pattern or a list of patterns, got {pattern!r}")
    urls = [u for p in patterns for u in braceexpand(p)]
    if not urls or any(not u for u in urls):
        raise ValueError(f"config key '{key}': empty shard spec {pattern!r}")
    return urls


def parse_spec(spec, key: str = "data.train") -> list[Source]:
    """The sources of a shard spec; errors name ``key``."""
    if isinstance(spec, str):
        return [Source("0", tuple(_expand(spec, key)), 1.0)]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"config key '{key}': expected a shard pattern or a non-empty list, got {spec!r}")
    sources = []
    for i, entry in enumerate(spec):
        k = f"{key}[{i}]"
        if isinstance(entry, str):
            urls = _expand(entry, k)
            sources.append(Source(str(i), tuple(urls), float(len(urls))))
            continue
        if not isinstance(entry, dict) or "shards" not in entry:
            raise ValueError(f"config key '{k}': expected a pattern or a mapping with 'shards', got {entry!r}")
        unknown = set(entry) - {"shards", "weight", "name"}
        if unknown:
            raise ValueError(f"config key '{k}': unknown field(s) {sorted(unknown)}; valid: shards, weight, name")
        urls = _expand(entry["shards"], k + ".shards")
        weight = entry.get("weight", len(urls))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"config key '{k}.weight' must be a positive number, got {weight!r}")
        sources.append(Source(str(entry.get("name", i)), tuple(urls), float(weight)))
    return sources


def local_file(url: str) -> str | None:
    """The path of a shard on this machine (a plain path or ``file:PATH``); None for ``pipe:`` and URLs
    with a scheme, which only reading can check."""
    if url.startswith("file:"):
        return url[5:]
    if url.startswith("pipe:") or "://" in url:
        return None
    return url


def check_local(spec, key: str = "data.train") -> None:
    """Raise :class:`~difftrain.config.ConfigError` (one line naming ``key`` and the first missing shard)
    when a local shard of ``spec`` does not exist or is a directory; ``pipe:`` and http(s) URLs are not
    checked. Also raises it for a malformed spec (what :func:`parse_spec` refuses)."""
    from difftrain.config import ConfigError

    try:
        sources = parse_spec(spec, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for i, src in enumerate(sources):
        missing = [u for u in src.urls
                   if (path := local_file(u)) is not None and (not os.path.exists(path) or os.path.isdir(path))]
        if not missing:
            continue
        k = key if isinstance(spec, str) else f"{key}[{i}]" + (".shards" if isinstance(spec[i], dict) else "")
        n = len(src.urls)
        what = (f"none of its {n} shard(s) exist" if len(missing) == n
                else f"{len(missing)} of its {n} shards are missing")
        raise ConfigError(f"config key '{k}': {what} (first missing: {missing[0]})")
