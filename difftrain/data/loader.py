"""A minimal, exact, resumable streaming loader over webdataset shards.

**Global order (world-size independent).** Epoch ``e`` reads the shards in the order
``random.Random(seed * 1000003 + e).shuffle(shards)`` and each shard's samples in stored order.
Consecutive runs of ``batch_size`` (GLOBAL) samples form global batch ``g``; ``g`` counts across
epochs, an epoch's incomplete last batch is dropped and epochs continue forever. Rank ``r`` of
``W`` takes slots ``[r*B/W, (r+1)*B/W)`` of every global batch and decodes only those samples
(the others' bytes are read but never decoded). Each sample also gets its global slot index
``g*B + slot`` (``batch["index"]``), the key for per-sample randomness (``diffusion/keyed.py``).

**Workers.** With ``num_workers = n > 0`` worker ``w`` produces the global batches
``g ≡ g_start + w (mod n)``; the DataLoader collects from workers round-robin, so the stream is
the same for any ``n`` (``n = 0`` runs in-process). Every worker reads every shard itself and
skips the batches it does not own: n-fold read amplification, fine for small data.
TODO(issue 3): assign shards (plus a sample-count index) to ranks/workers instead.

**Resume.** ``state_dict()`` is the position of the next batch handed to the consumer
(prefetched batches are not counted); ``load_state_dict`` before iterating restarts exactly
there. Skipping to the position reads the skipped samples' bytes without decoding them. A
``batch_in_epoch`` past the epoch's end continues with the next epoch.

**Bad samples** (a member outside the decoder whitelist, no image member, an undecodable image)
are decided from their own bytes only, so the choice is the same on every world size. A bad
sample is *dropped from its rank's slice*, never replaced: its slot stays empty, so a rank's
batch can have fewer than ``B/W`` rows (possibly 0), and the union over ranks is still exactly
the good samples of the global batch. Drops are counted in ``loader.skipped[reason]``. A trainer
that wants exact world-size-independent losses should normalize by the global count of rows.

**Keys** are grouped by webdataset's rule: a file name splits at the first dot of its base name
(``dir/000000123.seg.png`` -> key ``dir/000000123``, member ``seg.png``). Keys therefore must not
contain dots; a dotted key (``a.1.png``) has no plain ``png`` member and counts as
``missing_image``. img2dataset / video2dataset keys are digits. A corrupt tar raises.
"""
from __future__ import annotations

import logging
import random
import signal
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from difftrain.data.decode import IMAGE_EXTS, SkipSample, check_members, decode_sample, image_transform

log = logging.getLogger(__name__)
STATE_KEYS = ("epoch", "batch_in_epoch", "g")


def expand_spec(spec: str | list | tuple) -> list[str]:
    """Brace pattern (``a/{00000..00003}.tar``) or list of patterns -> list of shard urls."""
    from braceexpand import braceexpand

    patterns = [spec] if isinstance(spec, str) else list(spec)
    shards = [url for p in patterns for url in braceexpand(p)]
    if not shards or any(not s for s in shards):
        raise ValueError(f"config key 'data.train': empty shard spec {spec!r}")
    return shards


def shard_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The order epoch ``epoch`` reads the shards in."""
    order = list(shards)
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


class _Stream(IterableDataset):
    """The per-rank batch stream from a start position; pickled into every worker."""

    def __init__(self, shards, batch_size, rank, world, seed, channels, image_size, start):
        self.shards, self.B, self.seed, self.start = shards, batch_size, seed, dict(start)
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world
        self.channels, self.image_size = channels, image_size

    def _raw_epoch(self, epoch: int) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        urls = shard_order(self.shards, self.seed, epoch)
        return tarfile_samples(dict(url=u) for u in urls)  # raw bytes, grouped by key

    def positions(self, keep: Callable[[int], bool]) -> Iterator[tuple[dict, list]]:
        """Yield ``(position, [(slot, raw_sample), ...] of this rank)`` for each global batch g
        from the start position with ``keep(g)``; other batches are read and dropped."""
        B, lo, hi = self.B, self.lo, self.hi
        epoch, skip, g0 = (self.start[k] for k in STATE_KEYS)
        while True:
            own, n = [], 0
            for n, raw in enumerate(self._raw_epoch(epoch), start=1):
                b, slot = divmod(n - 1, B)
                g = g0 + b - skip
                if b < skip or not keep(g):
                    continue
                if lo <= slot < hi:
                    own.append((slot, raw))
                if slot == B - 1:
                    yield {"epoch": epoch, "batch_in_epoch": b, "g": g}, own
                    own = []
            if n < B:
                raise ValueError(f"config key 'data.batch_size' = {B} exceeds the {n} samples of "
                                 f"one epoch over {len(self.shards)} shard(s)")
            g0 += max(0, n // B - skip)
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        g_start = self.start["g"]
        to_tensor = image_transform(self.channels, self.image_size)
        for pos, own in self.positions(lambda g: (g - g_start) % nw == w):
            yield self._collate(pos, own, to_tensor)

    def _collate(self, pos: dict, own: list, to_tensor) -> dict:
        pixels, captions, labels, keys, index, skipped = [], [], [], [], [], Counter()
        for slot, raw in own:
            try:
                item = _decode(raw, to_tensor)
            except SkipSample as e:
                skipped[e.reason] += 1
                log.debug("skipping sample: %s", e)
                continue
            except Exception as e:  # a broken member: bad bytes are data, not a crash
                skipped["decode_error"] += 1
                log.debug("skipping sample %s of %s: %r", raw.get("__key__"), raw.get("__url__"), e)
                continue
            pixels.append(item["pixels"])
            captions.append(item["caption"])
            labels.append(item["label"])
            keys.append(raw["__key__"])
            index.append(pos["g"] * self.B + slot)
        c, s = self.channels, self.image_size
        return {
            "pixels": torch.stack(pixels) if pixels else torch.empty(0, c, s, s),  # [b, C, H, W]
            "captions": captions,
            "labels": torch.tensor(labels, dtype=torch.long),  # [b]
            "keys": keys,
            "index": torch.tensor(index, dtype=torch.long),  # [b] global slot g*B + slot
            "position": pos,
            "skipped": dict(skipped),
        }


def _decode(raw: dict, to_tensor) -> dict:
    """Raw sample -> {"pixels", "caption", "label"}; raises SkipSample / decode errors."""
    check_members(raw, raw.get("__url__", "?"))  # before anything is decoded
    image = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    if image is None:
        raise SkipSample(f"no image member in sample {raw.get('__key__')} of {raw.get('__url__')}",
                         reason="missing_image")
    d = decode_sample(raw, only=(image, "txt", "json", "cls"))
    meta = d.get("json") if isinstance(d.get("json"), dict) else {}
    caption = d.get("txt", meta.get("caption", ""))
    label = meta.get("label", d.get("cls", -1))
    if not isinstance(label, int) or isinstance(label, bool):
        label = -1
    return {"pixels": to_tensor(d[image]), "caption": caption if isinstance(caption, str) else "",
            "label": label}


def _ignore_sigterm(_worker_id: int) -> None:
    """Pre-emption sends SIGTERM to the whole process group: workers leave it to the trainer, which
    saves a checkpoint and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardLoader:
    """This rank's slice of the global batch stream; iterate for batches forever.

    A batch is ``{"pixels": float [b, C, H, W] in [-1, 1], "captions": list[str],
    "labels": long [b] (json "label", else cls, else -1), "keys": list[str],
    "index": long [b] (global slot index), "position": {"epoch", "batch_in_epoch", "g"}}``
    with ``b <= batch_size / world`` (bad samples are dropped, see the module docstring).

    Each ``iter(loader)`` starts fresh workers at ``state_dict()``; keep one iterator per run.
    """

    def __init__(self, spec, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 seed: int = 0, channels: int = 3, image_size: int = 32, prefetch_factor: int = 2):
        if batch_size <= 0 or world <= 0 or batch_size % world:
            raise ValueError(f"config key 'data.batch_size' = {batch_size} must be a positive "
                             f"multiple of the data-parallel world size {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the data-parallel world of {world}")
        if num_workers < 0:
            raise ValueError(f"config key 'data.num_workers' must be >= 0, got {num_workers}")
        image_transform(channels, image_size)  # validates channels early
        self.shards = expand_spec(spec)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.num_workers, self.seed, self.prefetch_factor = num_workers, seed, prefetch_factor
        self.channels, self.image_size = channels, image_size
        self.skipped: dict[str, int] = {}
        self._state = {"epoch": 0, "batch_in_epoch": 0, "g": 0}

    @classmethod
    def from_config(cls, data_cfg, rank: int, world: int, seed: int) -> "ShardLoader":
        """Build from a :class:`difftrain.config.DataConfig`."""
        return cls(data_cfg.train, data_cfg.batch_size, rank, world, data_cfg.num_workers, seed,
                   data_cfg.channels, data_cfg.image_size)

    def shard_order(self, epoch: int) -> list[str]:
        return shard_order(self.shards, self.seed, epoch)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, sd: dict) -> None:
        missing = [k for k in STATE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"data loader state lacks {missing}; got {sd!r}")
        state = {k: int(sd[k]) for k in STATE_KEYS}
        if any(v < 0 for v in state.values()) or state["batch_in_epoch"] > state["g"]:
            raise ValueError(f"invalid data loader state {sd!r}")
        self._state = state

    def __iter__(self) -> Iterator[dict]:
        stream = _Stream(self.shards, self.batch_size, self.rank, self.world, self.seed,
                         self.channels, self.image_size, self._state)
        nw = self.num_workers
        loader = DataLoader(stream, batch_size=None, num_workers=nw, persistent_workers=nw > 0,
                            prefetch_factor=self.prefetch_factor if nw > 0 else None,
                            worker_init_fn=_ignore_sigterm if nw > 0 else None)
        for batch in loader:
            for reason, count in batch.pop("skipped").items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
            p = batch["position"] = {k: int(v) for k, v in batch["position"].items()}
            self._state = {"epoch": p["epoch"], "batch_in_epoch": p["batch_in_epoch"] + 1,
                           "g": p["g"] + 1}
            yield batch
