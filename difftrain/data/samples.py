"""Raw webdataset sample -> training item, with every reason to skip a sample named.

An *item* is ``{"pixels": tensor, "caption": str, "label": int, "bucket": int}``; images give uint8
``pixels`` [C, h, w] for their aspect-ratio bucket, videos float [T, C, H, W]. With ``data.control`` an image item
also has ``control``, ControlNet's condition image, in the shape, dtype and layout of ``pixels``: the sample's
``control.<ext>`` member (``KEY.control.png`` in a shard; ``member``), resized to the image's size if it
differs and then cropped, resized and flipped with the image's own keyed draws, so the two stay aligned; or
a transform of the decoded image (``edges``, ``blur``, ``grayscale``, your own: :mod:`difftrain.data.control`).
Pre-encoded shards (``kind="latent"``, :mod:`difftrain.data.latents`) give ``latent_mean`` (and ``latent_std``,
``text_states``, ``text_mask``) instead of ``pixels``. A sample that cannot or must not be used
raises :class:`SkipSample` with one of these ``reason`` s (the loader's counters):

| reason              | cause                                                              |
| ------------------- | ------------------------------------------------------------------ |
| unsafe_member       | a member outside the decoder whitelist (``.pkl``, ``.pth``, ...)    |
| missing_media       | no image (or video) member                                         |
| missing_control     | ``data.control=member``: no ``control.<ext>`` image member          |
| empty_member        | a zero-byte member                                                 |
| bad_json            | a json member that is not UTF-8 JSON                                |
| missing_caption     | no caption (txt, or json ``caption``), or an empty one, when required |
| decode_error        | image bytes PIL cannot decode (corrupt or truncated)                |
| too_large           | more than ``decode.MAX_PIXELS`` pixels (decompression-bomb guard)   |
| too_small           | shorter side below ``data.min_image_size``                          |
| video_*             | see :mod:`difftrain.data.video`                                    |
| bad_latent          | latent shards: no readable safetensors member, or bad tensors      |
| filtered:KEY        | json metadata fails ``data.filters`` (or img2dataset status)        |

``filtered:*`` are choices, not faults: they do not count toward ``data.max_skip_rate``.
Every check looks at the sample's own bytes only, so the decision is the same on any world size.
"""
from __future__ import annotations

import json
import operator
from typing import Callable

from difftrain.data.control import apply_control, check_control
from difftrain.data.decode import IMAGE_EXTS, VIDEO_EXTS, SkipSample, check_members, open_image
from difftrain.data.images import ImageTransform, nearest_bucket, to_mode

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
        "!=": operator.ne}


def parse_filters(filters: dict) -> list[tuple[str, Callable, float, str]]:
    """``data.filters`` ({json_key: "<op><number>"}, e.g. {"punsafe": "<0.5", "aesthetic": ">=5"})."""
    out = []
    if not isinstance(filters, dict):
        raise ValueError(f"config key 'data.filters' must be a mapping of json key -> '<op><number>', got {filters!r}")
    for key, cond in filters.items():
        text = str(cond).strip()
        op = next((o for o in (">=", "<=", "==", "!=", ">", "<") if text.startswith(o)), None)
        try:
            value = float(text[len(op):]) if op else None
        except ValueError:
            value = None
        if op is None or value is None:
            raise ValueError(f"config key 'data.filters.{key}' must look like '>=5' or '<0.5', got {cond!r}")
        out.append((key, _OPS[op], value, text))
    return out


class SampleDecoder:
    """Decides and decodes one raw sample; ``rand(name)`` gives its keyed uniforms."""

    def __init__(self, kind: str = "image", channels: int = 3, buckets=((32, 32),), crop: str = "center",
                 flip: bool = False, min_image_size: int = 0, require_caption: bool = False,
                 filters: dict | None = None, frames: int = 16, frame_stride: int = 1, fps: float = 0.0,
                 control: str = ""):
        if kind not in ("image", "video", "latent"):
            raise ValueError(f"config key 'data.kind' must be image, video or latent here, got {kind!r}")
        self.kind, self.channels, self.buckets = kind, channels, list(buckets)
        self.transform = ImageTransform(channels, crop, flip)
        self.min_size, self.require_caption = min_image_size, require_caption
        self.filters = parse_filters(filters or {})
        self.frames, self.stride, self.fps = frames, frame_stride, fps
        self.control, self.control_fn = control, check_control(control, kind)

    def __call__(self, raw: dict, rand: Callable[[str], float]) -> dict:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        where = f"sample {key} of {url}"
        check_members(raw, url)
        media = {"image": IMAGE_EXTS, "video": VIDEO_EXTS, "latent": ("safetensors",)}[self.kind]
        if not any(e in raw for e in media):
            raise SkipSample(f"no {self.kind} member in {where}", "bad_latent" if self.kind == "latent"
                             else "missing_media")
        for m, v in raw.items():
            if not m.startswith("__") and len(v) == 0:
                raise SkipSample(f"zero-byte member '{m}' in {where}", "empty_member")
        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise SkipSample(f"unreadable json in {where}: {e}", "bad_json") from None
            if not isinstance(meta, dict):
                meta = {}
        caption = raw["txt"].decode("utf-8", "replace") if "txt" in raw else meta.get("caption")
        caption = caption.strip() if isinstance(caption, str) else ""
        if self.require_caption and not caption:
            raise SkipSample(f"missing or empty caption in {where}", "missing_caption")
        if meta.get("status", "success") != "success":
            raise SkipSample(f"img2dataset status {meta.get('status')!r} in {where}", "filtered:status")
        for k, op, value, text in self.filters:
            v = meta.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not op(v, value):
                raise SkipSample(f"json '{k}' = {v!r} fails filter '{text}' in {where}", f"filtered:{k}")
        label = meta.get("label", -1)
        if "cls" in raw:
            try:
                label = int(raw["cls"].decode("utf-8").strip())
            except ValueError:
                pass
        if not isinstance(label, int) or isinstance(label, bool):
            label = -1
        item = {"caption": caption, "label": label}
        if self.kind == "latent":
            from difftrain.data.latents import decode_latents

            item.update(decode_latents(raw, meta, self.buckets, where))
        else:
            item.update(self._video(raw, rand, where) if self.kind == "video" else self._image(raw, rand, where))
        return item

    def _image(self, raw: dict, rand, where: str) -> dict:
        ext = next(e for e in IMAGE_EXTS if e in raw)  # one exists: checked in __call__
        member = None
        if self.control == "member":  # before any decoding: a sample without one is skipped cheaply
            member = next((f"control.{e}" for e in IMAGE_EXTS if f"control.{e}" in raw), None)
            if member is None:
                raise SkipSample(f"no control image member (control.png|jpg|jpeg|webp) in {where}", "missing_control")
        img = open_image(raw[ext], self.min_size, where)
        w, h = img.size
        b = nearest_bucket(self.buckets, w, h)
        item = {"pixels": self.transform(img, self.buckets[b], rand), "bucket": b}
        if member is not None:
            ctrl = open_image(raw[member], 0, f"the control image ({member}) of {where}")
            if ctrl.size != img.size:  # stretched onto the image, so the crop below lands on the same content
                from PIL import Image

                ctrl = to_mode(ctrl, self.channels).resize(img.size, resample=Image.Resampling.BILINEAR)
            item["control"] = self.transform(ctrl, self.buckets[b], rand)  # the same keyed crop and flip draws
        elif self.control_fn is not None:
            item["control"] = apply_control(self.control_fn, self.control, item["pixels"], self.channels)
        return item

    def _video(self, raw: dict, rand, where: str) -> dict:
        from difftrain.data.video import decode_video

        ext = next(e for e in VIDEO_EXTS if e in raw)
        size = self.buckets[0][0]
        x = decode_video(raw[ext], self.frames, size, stride=self.stride, fps=self.fps or None,
                         u=rand("clip_start"), channels=self.channels, key=raw.get("__key__", "?"),
                         shard=raw.get("__url__", "?"))
        if self.transform.flip and rand("flip") < 0.5:
            x = x.flip(-1)
        return {"pixels": x, "bucket": 0}
