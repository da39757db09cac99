"""Pre-encoded (latent) shards: the format :mod:`difftrain.data.encode` writes and ``data.kind=latent`` reads.

**Layout.** ``difftrain data encode CONFIG --out DIR`` turns every shard of the config's ``data.train``
into ``DIR/<same file name>`` (``.tar``; a ``.tar.gz`` source gives a plain ``.tar``), with the same
keys in the same order; samples the source decoder skips are not written. Per sample::

    KEY.safetensors   latent_mean  float [c, h, w] (video [T, c, h, w])  VAE posterior mean, scaled
                      latent_std   float, same shape                    VAE posterior std, scaled (no VAE: absent)
                      text_states  float [L, D]                         text states, padded to L (model.cond=text)
                      text_mask    uint8 [L]                            1 = real token (model.cond=text)
                      noise        float, same shape as latent_mean     reflow pairs only (see below)
    KEY.txt, KEY.cls  the source's bytes, unchanged (when present)
    KEY.json          the source's JSON bytes with one field spliced in before the closing brace:
                      "difftrain": {"format", "vae", "text", "text_max_length", "latent_shape", "dtype",
                                    "size": [h, w] (pixels), "fingerprints": {"vae", "text"}}

"Scaled" means the VAE's own latent convention, ``(z - shift_factor) * scaling_factor`` for the mean
and ``std * scaling_factor`` for the std, so ``mean + std * eps`` is a posterior sample in the
space the model trains in. Without a VAE (pixel space) ``latent_mean`` is the pixels in [-1, 1].
Float tensors are stored in ``--dtype`` (float16 by default; float32 keeps them exact).

Beside the shards::

    DIR/encode_info.json     format, encoders (the run's encoders.* values, data.channels) and their
                             fingerprints, latent and text shapes/dtypes, the source spec and
                             decoding (kind, image size, buckets, filters ...), shard names, versions
    DIR/null.safetensors     text_states float32 [L, D], text_mask uint8 [L]: the encoding of ""
                             (TextEncoder.null_states), the caption-dropout null condition
    DIR/NAME_stats.json      per shard: source url, samples read, written, skipped {reason: n}, error

The null condition is stored once, in float32 whatever ``--dtype``, so a run on latent shards needs
no text encoder and drops captions to exactly the states the online path uses (its null is
``null_states()`` too). **Fingerprints** are a hash of each encoder's weights, sampled (4096 values per
tensor, plus every name, shape and dtype): a different or fine-tuned checkpoint changes them; they
let a run accept an encoder folder that moved.

**Reflow pairs.** ``difftrain distill pairs TEACHER --out DIR`` (:mod:`difftrain.distill.pairs`) writes this
layout from a teacher's ODE instead of an encoder: ``latent_mean`` = x^ = Phi(z), the teacher's model-space
sample (no ``latent_std``), and ``noise`` = z, the keyed noise it started from; ``KEY.cls`` / ``KEY.txt`` hold
its class label / caption, and ``encode_info.json`` has a ``pairs`` block describing the teacher and solver.

A run reads the shards with ``data.kind=latent`` (same ``data.image_size`` / ``data.buckets``): the
item is ``{"latent_mean", "latent_std" (VAE only), "noise" (pairs only), "text_states", "text_mask" (text
only), "caption", "label", "bucket"}``; a sample without a readable safetensors member, or with missing or
inconsistent tensors (a ``noise`` of another shape than ``latent_mean`` too), is skipped as ``bad_latent``.
:func:`load_latent_data` checks the shards' ``encode_info.json`` against the run's config (a one-line
:class:`ConfigError` naming ``data.train``) and loads the null condition.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from difftrain.data.decode import SkipSample

if TYPE_CHECKING:
    from difftrain.config import DataConfig, EncodersConfig

FORMAT = 1
INFO = "encode_info.json"
NULL = "null.safetensors"
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


# ------------------------------------------------------------------------------------------ names
def shard_name(url: str) -> str:
    """The file name in a shard URL: ``/d/00001.tar``, ``file:/d/00001.tar``, ``https://h/d/00001.tar?x=1``
    and ``pipe:aws s3 cp s3://b/d/00001.tar -`` all give ``00001.tar``."""
    text = url[5:] if url.startswith("pipe:") else url
    tokens = [t for t in text.split() if ".tar" in t or ".tgz" in t] or [text]
    name = tokens[-1].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"cannot tell the file name of shard {url!r}")
    return name


def output_name(url: str) -> str:
    """The latent shard's file name: the source's, uncompressed (``x.tar.gz``, ``x.tgz`` -> ``x.tar``)."""
    name = shard_name(url)
    if name.endswith(".tgz"):
        return name[:-4] + ".tar"
    for ext in _COMPRESSED:
        if name.endswith(".tar" + ext):
            return name[:-len(ext)]
    return name


def sibling(url: str, filename: str, name: str | None = None) -> str:
    """``url`` with its file name (``name``, default: the shard's) replaced by ``filename``: a file in the same
    folder, through the same scheme or ``pipe:`` command."""
    name = name or shard_name(url)
    i = url.rfind(name)
    return url[:i] + filename + url[i + len(name):]


def _read(url: str) -> bytes:
    from difftrain.data.tario import local_path

    path = local_path(url)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    from webdataset.gopen import gopen

    with gopen(url, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ encoders
def fingerprint(module: torch.nn.Module | None) -> str:
    """A hash of a module's weights: every name, shape and dtype, and up to 4096 evenly strided values per
    tensor (as float32). Cheap for any size; a fine-tuned or different checkpoint changes it."""
    if module is None:
        return ""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(flat[::max(1, flat.numel() // 4096)].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def encoder_identity(ecfg: EncodersConfig, cond: str, channels: int) -> dict:
    """What makes two encodings interchangeable, as config values: text encoder and length (text models,
    ``model.cond=text``, only), VAE, input channels (``data.channels``)."""
    text = cond == "text"
    return {"text": ecfg.text if text else "", "text_max_length": ecfg.text_max_length if text else 0,
            "vae": ecfg.vae, "channels": channels}


_KEY_NAMES = {"text": "encoders.text", "text_max_length": "encoders.text_max_length", "vae": "encoders.vae",
              "channels": "data.channels"}


# ------------------------------------------------------------------------------------------ reading
def decode_latents(raw: dict, meta: dict, buckets: list[tuple[int, int]], where: str) -> dict:
    """A latent sample's tensors (``SampleDecoder`` with ``kind="latent"``); SkipSample ``bad_latent``."""
    from safetensors.torch import load

    data = raw.get("safetensors")
    if data is None:
        raise SkipSample(f"no safetensors member in {where}", "bad_latent")
    try:
        t = load(data)
    except Exception as e:  # safetensors raises its own error types on bad bytes
        raise SkipSample(f"undecodable safetensors member in {where}: {type(e).__name__}: {e}", "bad_latent") from None
    mean, std, noise = t.get("latent_mean"), t.get("latent_std"), t.get("noise")
    states, mask = t.get("text_states"), t.get("text_mask")
    if (mean is None or not mean.is_floating_point() or (std is not None and std.shape != mean.shape)
            or (noise is not None and (not noise.is_floating_point() or noise.shape != mean.shape))
            or (states is None) != (mask is None)
            or (states is not None and (states.ndim != 2 or mask.shape != states.shape[:1]))):
        raise SkipSample(f"missing or inconsistent latent tensors {sorted(t)} in {where}", "bad_latent")
    item = {k: v for k, v in (("latent_mean", mean), ("latent_std", std), ("noise", noise), ("text_states", states),
                              ("text_mask", mask)) if v is not None}
    size = (meta.get("difftrain") or {}).get("size")
    if len(buckets) == 1:
        item["bucket"] = 0
    elif isinstance(size, list) and tuple(size) in buckets:
        item["bucket"] = buckets.index(tuple(size))
    else:
        raise SkipSample(f"latent of pixel size {size} is in none of data.buckets {buckets} in {where}", "bad_latent")
    return item


def read_info(spec) -> tuple[dict, str]:
    """The ``encode_info.json`` beside the shards of every source of ``spec`` (they must agree), and the URL
    of the first one."""
    from difftrain.config import ConfigError
    from difftrain.data.spec import parse_spec

    infos = []
    for src in parse_spec(spec):
        url = sibling(src.urls[0], INFO)
        try:
            infos.append((json.loads(_read(url)), url))
        except Exception as e:
            raise ConfigError(f"config key 'data.train' = {spec!r}: data.kind=latent needs shards written by "
                              f"'difftrain data encode', but {url} cannot be read ({type(e).__name__}: {e})") from None
    info, url = infos[0]
    what = lambda d: [d.get(k) for k in ("encoders", "fingerprints", "latent", "text")]  # noqa: E731
    for other, other_url in infos[1:]:
        if what(other) != what(info):
            raise ConfigError(f"config key 'data.train' = {spec!r} mixes latent shards of different encoders "
                              f"({url} and {other_url})")
    return info, url


def check_encoders(data: DataConfig, ecfg: EncodersConfig, cond: str, info: dict, text=None, vae=None) -> None:
    """Refuse latent shards encoded by other encoders than the run's ``encoders.*`` (``ecfg``, with ``model.cond``
    = ``cond``) or at another image geometry (``data.*``). Config values are compared; where the run's modules are
    given, equal weight fingerprints also accept a different path (a moved folder) and different ones refuse an
    equal path."""
    from difftrain.config import ConfigError
    from difftrain.data.images import parse_buckets

    if info.get("format") != FORMAT:
        raise ConfigError(f"config key 'data.train' = {data.train!r}: latent format {info.get('format')!r}, "
                          f"this difftrain reads format {FORMAT}; re-encode the shards")
    want, have = encoder_identity(ecfg, cond, data.channels), info.get("encoders", {})
    fp_have = info.get("fingerprints", {})
    fp_run = {"text": fingerprint(text) if text is not None and want["text"] else None,
              "vae": fingerprint(vae) if vae is not None else None}
    diffs = []
    for k, v in want.items():
        if k in ("text", "text_max_length") and not want["text"]:
            continue  # the run uses no text states: whatever the shards hold is fine
        same_weights = k in fp_run and fp_run[k] is not None and fp_run[k] == fp_have.get(k)
        if v != have.get(k) and not same_weights:
            diffs.append(f"{_KEY_NAMES[k]} is {v!r} but the shards used {have.get(k)!r}")
        elif k in fp_run and fp_run[k] is not None and fp_run[k] != fp_have.get(k):
            diffs.append(f"{_KEY_NAMES[k]} = {v!r} has other weights (fingerprint {fp_run[k]}) "
                         f"than the shards' ({fp_have.get(k)})")
    src = info.get("source", {})
    buckets = [list(b) for b in parse_buckets(data.buckets, data.image_size)]
    if src.get("buckets") != buckets:
        diffs.append(f"data.image_size/buckets give {buckets} px but the shards were encoded at {src.get('buckets')}")
    if diffs:
        raise ConfigError(f"config key 'data.train' = {data.train!r}: latent shards do not match this run: "
                          + "; ".join(diffs) + " (re-encode with 'difftrain data encode', or match the config)")


def load_null(info: dict, info_url: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored null condition ``(states float32 [L, D], mask bool [L])``; None without text states."""
    from safetensors.torch import load

    if not info.get("null"):
        return None
    t = load(_read(sibling(info_url, info["null"], INFO)))
    return t["text_states"].float(), t["text_mask"].bool()


@dataclass
class LatentData:
    info: dict
    null_text: tuple[torch.Tensor, torch.Tensor] | None  # for Conditioner(null_text=...)
    text_dim: int  # 0 without text states
    latent_channels: int


def load_latent_data(data: DataConfig, ecfg: EncodersConfig, cond: str, text=None, vae=None) -> LatentData:
    """For a run with ``data.kind=latent``: read and check the shards' ``encode_info.json`` against the run's
    ``data`` and ``encoders`` sections and ``model.cond`` (pass the run's text encoder and VAE when it builds
    them, to compare weights too) and load the null condition."""
    info, url = read_info(data.train)
    check_encoders(data, ecfg, cond, info, text, vae)
    t = info.get("text") or {}
    return LatentData(info, load_null(info, url), int(t.get("dim", 0)), int(info["latent"]["channels"]))
