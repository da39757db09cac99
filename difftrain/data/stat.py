"""``difftrain data stat SPEC [data.key=value ...]``: one pass over a shard spec through the training loader,
with the good samples, every skip reason and the rate.

    difftrain data stat "data/photos/{00000..00099}.tar" data.image_size=256 --workers 4
    difftrain data stat "data/clips/{00000..00009}.tar" data.kind=video data.frames=16 'data.filters={punsafe: "<0.5"}'

**What runs.** A :class:`~difftrain.data.loader.ShardLoader` over the :class:`~difftrain.config.DataConfig`
of the defaults, the ``data.*`` overrides (parsed as ``difftrain train`` parses them) and ``data.train =
SPEC``: each sample is read by the loader's streams and decoded, checked and transformed by the run's
:class:`~difftrain.data.samples.SampleDecoder` (``data.kind``, ``image_size`` / ``buckets``, ``crop``,
``require_caption``, ``min_image_size``, ``filters``, video frames ...), and each skip is counted by the
loader under its reason (the table in ``samples.py``; ``shard_*`` reasons count shards, not samples). The
decoded tensors are dropped in the worker, since the report needs only counts: the rate is read + decode +
transform, without the collation and the transfer of pixel batches that training adds.

**Exactly one pass.** The loader's streams never end: they go on into epoch 1, and in lockstep, so a stream
that has finished its shards reads (and skips, and counts) samples of the next epoch while the others finish.
The stat therefore lays the pass out itself, through the loader's resume path (``load_state_dict``): the
shards of every source form one source, followed by a one-sample *sentinel* tar written to a temp folder;
each of the ``K = max(1, workers)`` streams (one per worker, ``batch_size`` rows a batch) gets a queue of real
shards, balanced by file size, and then reads the sentinel again and again. The pass ends when every stream
has given a sentinel row. Every shard is read once, nothing of a second epoch is read, and the loader's own
counters are the pass's: ``good`` is exactly the good samples of one epoch, and every skip reason exactly
its count. A source's mixing weight does not matter for a pass (a shard listed twice is read twice).

The stat sets ``data.shuffle_buffer=0`` and ``data.resampled=false`` (order does not matter; a pass reads
each shard once) and ``data.max_skip_rate=1.0``: it is a report, so mostly broken data is counted, not
refused with :class:`~difftrain.data.loader.DataError`. ``--max-samples N`` stops after the first batch that
reaches N good samples (a partial pass, marked as such).

**Printed.** A tqdm bar on stderr (samples read per second, skips so far); on stdout a table of ``good`` and
each skip reason with its rate (sample reasons: of the samples read = good + skipped samples; ``shard_*``
reasons: of the shards), the rates, and last one line exactly ``good=N skipped=M samples_per_s=X``: ``N``
good samples, ``M`` the sum of all skip counters (as ``ShardLoader.counts()`` reports them), ``X`` samples
read per second after each worker's first batch (worker start-up and imports left out; over the whole wall
time when the pass is not longer than that).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

SENTINEL_KEY = "difftrain_stat_end"


def _is_shard_reason(reason: str) -> bool:
    return reason.startswith("shard_")  # tario.ShardError reasons: counted once per shard


class _StatDecoder:
    """The run's decoder for real samples and a marker row for the sentinel; rows carry no tensors, only
    ``stat_bucket`` (the item's bucket; -1: the sentinel). The loader sees one bucket, so any mix of
    buckets is emitted in read order (no bucket pools)."""

    def __init__(self, decoder, sentinel: str):
        self.decoder, self.sentinel = decoder, sentinel
        self.buckets = list(decoder.buckets[:1])

    def __call__(self, raw: dict, rand) -> dict:
        if raw.get("__url__") == self.sentinel:
            return {"stat_bucket": -1}
        item = self.decoder(raw, rand)  # SkipSample and any other error: counted by the loader
        return {"stat_bucket": int(item.get("bucket", 0))}


def _escape(url: str) -> str:
    """A URL as a brace pattern that expands to itself."""
    return url.replace("\\", "\\\\").replace("{", "\\{").replace("}", "\\}")


def _write_sentinel(path: Path) -> str:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(f"{SENTINEL_KEY}.txt")
        info.size = 0
        tf.addfile(info, io.BytesIO(b""))
    return str(path)


def _size(url: str) -> int:
    from difftrain.data.tario import local_path

    path = local_path(url)
    if path is None:
        return 1  # remote: no size without a request; equal shares
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # missing: the loader counts it as shard_unreadable


def _pass_state(urls: list[str], sentinel: str, K: int, seed: int) -> dict:
    """A loader state (``load_state_dict`` format, layout ``K x 1``) in which stream ``k`` reads its queue of
    real shards (position order; positions balanced by size over the streams) and then the sentinel forever."""
    from difftrain.data.spec import Source
    from difftrain.data.streams import ShardSequence, initial_state

    seq = ShardSequence(Source("stat", tuple(urls) + (sentinel,), 1.0), 0, seed, False)
    order = [seq.at(j)[0] for j in range(len(urls) + 1)]  # epoch 0: position -> url
    j_end = order.index(sentinel)
    real = sorted((j for j in range(len(order)) if j != j_end), key=lambda j: (-_size(order[j]), j))
    load, queues = [0] * K, [[] for _ in range(K)]
    for j in real:  # largest first to the least loaded stream
        k = min(range(K), key=lambda i: (load[i], i))
        queues[k].append(j)
        load[k] += max(1, _size(order[j]))
    streams = {}
    for k in range(K):
        st = initial_state(k, K, 1)
        st["src"][0]["queue"] = [[j, 0, 0] for j in sorted(queues[k])]
        st["src"][0]["tail"] = [j_end, 0, 0]  # stride 0: the sentinel, again and again
        streams[str(k)] = {"stream": st, "pool": []}
    return {"layout": [K, 1], "g": 0, "streams": streams, "sources": [len(order)]}


def data_config(spec, overrides: list[str] = ()):
    """The DataConfig of the defaults, the ``data.*`` overrides and ``data.train = spec``."""
    from difftrain.config import ConfigError, parse_override
    from difftrain.config_checks import load_config

    kind = "image"
    for o in overrides:
        key, value = parse_override(o)
        if not key.startswith("data."):
            raise ConfigError(f"config override '{o}': data stat takes data.* overrides only")
        if key == "data.train":
            raise ConfigError(f"config override '{o}': the shards are the SPEC argument, not data.train")
        kind = value if key == "data.kind" else kind
    model = ["model.frames=1"] if kind == "video" else []  # no model here: pass the data/model cross-check
    cfg = load_config(None, [*overrides, *model])
    return dataclasses.replace(cfg.data, train=spec)


def stat(d, workers: int | None = None, batch_size: int | None = None, max_samples: int = 0,
         seed: int = 0, progress: bool = True) -> dict:
    """One pass over ``d.train`` (a :class:`DataConfig`) through the loader; see the module docstring.

    Returns ``{"good", "skipped": {reason: n}, "skipped_total", "samples_read", "seconds", "startup_s",
    "samples_per_s", "good_per_s", "shards", "workers", "batch_size", "complete", "buckets": {"HxW": n}}``."""
    from tqdm import tqdm

    from difftrain.config import ConfigError
    from difftrain.data.images import parse_buckets
    from difftrain.data.loader import ShardLoader
    from difftrain.data.samples import SampleDecoder
    from difftrain.data.spec import parse_spec

    workers = d.num_workers if workers is None else workers
    B = d.batch_size if batch_size is None else batch_size
    if workers < 0 or B <= 0 or max_samples < 0:
        raise ConfigError(f"need --workers >= 0, --batch-size > 0 and --max-samples >= 0; got {workers}, {B}, "
                          f"{max_samples}")
    try:
        urls = [u for s in parse_spec(d.train) for u in s.urls]
        buckets = parse_buckets(d.buckets, d.image_size)
        decoder = SampleDecoder(d.kind, d.channels, buckets, d.crop, d.flip, d.min_image_size,
                                d.require_caption, d.filters, d.frames, d.frame_stride, d.fps)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    workers = min(workers, len(urls))  # a worker per stream; more streams than shards would only idle
    K = max(1, workers)
    skipped: dict[str, int] = {}
    good, per_bucket, done = 0, Counter(), set()
    with tempfile.TemporaryDirectory(prefix="difftrain_stat_") as tmp:
        sentinel = _write_sentinel(Path(tmp) / "end.tar")
        spec = [{"shards": [_escape(u) for u in urls + [sentinel]], "weight": 1.0}]
        ld = ShardLoader(spec, B, 0, 1, num_workers=workers, seed=seed, decoder=_StatDecoder(decoder, sentinel),
                         shuffle_buffer=0, resampled=False, streams=1, max_skip_rate=1.0, groups=K,
                         check_paths=False)  # a report: a missing shard is counted (shard_unreadable)
        ld.load_state_dict(_pass_state(urls, sentinel, K, seed))
        t0 = time.perf_counter()
        bar = tqdm(desc="data stat", unit="sample", disable=not progress, file=sys.stderr)
        it = iter(ld)
        read, n, first = 0, 0, None  # first: (time, samples read, good) once every worker has given a batch
        try:
            while len(done) < K and not (max_samples and good >= max_samples):
                batch = next(it)
                rows = batch["stat_bucket"]
                real = rows[rows >= 0]
                if len(real) < len(rows):
                    done.add(batch["position"]["g"] % K)  # this stream has finished its shards
                good += len(real)
                per_bucket.update(real.tolist())
                skipped = dict(ld.skipped)
                now = good + sum(v for k, v in skipped.items() if not _is_shard_reason(k))
                bar.update(now - read)
                read = now
                bar.set_postfix(good=good, skipped=sum(skipped.values()), refresh=False)
                n += 1
                first = first or ((time.perf_counter(), read, good) if n == K else None)
        finally:
            it.close()  # shuts the workers down
            bar.close()
        end = time.perf_counter()
    seconds, (t1, read1, good1) = end - t0, first or (end, 0, 0)
    if read > read1 and end > t1:  # the rate after the first batch of each worker: start-up and imports left out
        sps, gps = (read - read1) / (end - t1), (good - good1) / (end - t1)
    else:
        sps, gps = read / seconds, good / seconds
    return {"good": good, "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
            "samples_read": read, "seconds": seconds, "startup_s": t1 - t0, "samples_per_s": sps, "good_per_s": gps,
            "shards": len(urls), "workers": workers, "batch_size": B, "complete": len(done) == K,
            "buckets": {f"{buckets[b][0]}x{buckets[b][1]}": n for b, n in sorted(per_bucket.items())}}


def report(res: dict, d) -> str:
    """The stdout text of a stat result: a table, then ``good=N skipped=M samples_per_s=X`` last."""
    read, shards = res["samples_read"], res["shards"]

    def pct(n, of):
        return f"{100 * n / of:.2f} %" if of else "-"

    size = f"{d.image_size} px" if not d.buckets else f"buckets {d.buckets}"
    what = "one full pass" if res["complete"] else "stopped at --max-samples (partial pass)"
    lines = [f"data stat: {shards} shard(s), data.kind={d.kind}, {size}, {res['workers']} worker(s), batch "
             f"{res['batch_size']}: {what} in {res['seconds']:.1f} s ({res['startup_s']:.1f} s to the first batches)", "",
             "| | count | rate |", "|---|---|---|",
             f"| good | {res['good']} | {pct(res['good'], read)} of samples |"]
    for reason, n in res["skipped"].items():
        shard = _is_shard_reason(reason)
        lines.append(f"| skipped/{reason} | {n} | {pct(n, shards if shard else read)} of "
                     f"{'shards' if shard else 'samples'} |")
    lines.append(f"| samples read | {read} | {res['samples_per_s']:.1f} /s |")
    lines.append(f"| good samples | {res['good']} | {res['good_per_s']:.1f} /s |")
    if len(res["buckets"]) > 1:
        lines += ["", "| bucket (h x w) | good |", "|---|---|"]
        lines += [f"| {b} | {n} |" for b, n in res["buckets"].items()]
    lines += ["", f"good={res['good']} skipped={res['skipped_total']} samples_per_s={res['samples_per_s']:.1f}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line (``difftrain data stat``)


def add_stat_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``stat`` arguments to an argparse (sub)parser; pair with :func:`run_stat`."""
    parser.add_argument("spec", help="shard spec (data.train): a brace pattern such as 'data/{00000..00099}.tar', "
                                     "or a YAML list of patterns / {shards, weight, name} mappings")
    parser.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.image_size=256 data.kind=video")
    parser.add_argument("--workers", type=int, help="loader worker processes (default: data.num_workers)")
    parser.add_argument("--batch-size", type=int, help="samples per batch (default: data.batch_size)")
    parser.add_argument("--max-samples", type=int, default=0, help="stop after this many good samples (0: a full pass)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def _parse_spec_arg(text: str):
    """SPEC as given, or a YAML list (``[a.tar, {shards: b.tar, weight: 2}]``) parsed."""
    import yaml

    from difftrain.config import ConfigError

    if not text.lstrip().startswith("["):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", "") or e).split())
        raise ConfigError(f"shard spec {text!r} is not a valid YAML list ({problem}); quote patterns with braces: "
                          f"\"['a/{{0..9}}.tar', {{shards: 'b/{{0..9}}.tar', weight: 2}}]\"") from None


def run_stat(args) -> dict:
    """Run :func:`stat` from parsed :func:`add_stat_args` arguments; prints :func:`report` and returns the
    result. Bad arguments raise :class:`~difftrain.config.ConfigError` (one line)."""
    d = data_config(_parse_spec_arg(args.spec), args.overrides)
    res = stat(d, args.workers, args.batch_size, args.max_samples, progress=args.progress)
    print(report(res, d), flush=True)
    return res
