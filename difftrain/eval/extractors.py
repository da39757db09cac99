"""Feature extractors for sample-quality metrics (FID, KID, precision/recall, class accuracy, CLIP score).

Every extractor is an :class:`Extractor`: it takes uint8 images [N, H, W, C] (C = 1 or 3, any size),
does the preprocessing its network expects and returns ``{"features": float32 [N, dim]}``, plus
``"logits"`` [N, num_classes] for a classifier (the contract: :mod:`difftrain.eval.extractor_base`). Specs for
:func:`build_extractor` (``EXTRACTORS``: the name before the first ':' -> its builder):

``digits`` | ``digits:STYLE``
    A small CNN trained (seconds, cached) on the demo's scikit-learn digits; 128-d features and 10-class
    logits, so the demo's FID and class accuracy work offline (:mod:`difftrain.eval.digits_classifier`).
    ``digits:bold`` is the same network trained on the digits drawn in that style (``difftrain data demo
    --style bold``), for models fine-tuned to it.
``inception`` | ``inception:FILE``
    The Inception-v3 of the reference FID implementation (Heusel et al. 2017), 2048-d pool3 features,
    from ``pt_inception-2015-12-05-6726825d.pth`` of pytorch-fid (:mod:`difftrain.eval.inception`).
    Without a path the file is looked up in ``$DIFFTRAIN_INCEPTION`` (file or folder) and the cache folder.
``clip:FOLDER``
    A Hugging Face transformers CLIP folder (``CLIPModel`` weights, ``config.json``, tokenizer files and
    ``preprocessor_config.json``, as on the hub; tokenizer in ``tokenizer/`` also works). Features are
    the L2-normalised image embeddings; ``clip.clip_score`` scores captions (Hessel et al. 2021) (:mod:`difftrain.eval.clip`).
``clip:open_clip:ARCH:FILE``
    An open_clip architecture (e.g. ``ViT-B-32``) with weights from FILE (safetensors, or a state dict
    read with ``weights_only=True``). Needs the optional ``open_clip`` package (``pip install
    difftrain[clip]``; the test extra installs it).

Nothing is downloaded and nothing is unpickled: weights load with safetensors or
``torch.load(weights_only=True)``. ``fingerprint`` is a hash of the weights behind ``features`` (and
``logits``) and of the preprocessing; the evaluation caches reference statistics under it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from difftrain.eval.clip import build_clip
from difftrain.eval.extractor_base import Extractor, default_cache_dir, load_weights_file


# ------------------------------------------------------------------------------------- inception
class InceptionExtractor(Extractor):
    """FID Inception-v3: 2048-d pool3 features (the 1008-class ``fc`` is loaded but unused)."""

    name, dim = "inception", 2048
    PREPROCESS = "uint8/255|bilinear299-align_corners=False|2x-1|gray->rgb"

    def __init__(self, net: nn.Module):
        super().__init__()
        self._hold(net, f"inception|{self.PREPROCESS}")

    def extract(self, images):
        from difftrain.eval.inception import preprocess

        return {"features": self.net.pool3(preprocess(images))}


def find_inception(path: str | None, cache_dir: str | Path | None = None) -> Path:
    """The weight file: ``path`` (a file, or a folder holding it), else ``$DIFFTRAIN_INCEPTION`` (same),
    else the cache folder; FileNotFoundError naming where it looked and where to get it."""
    from difftrain.eval.inception import FILE_NAME, URL

    names = (FILE_NAME, FILE_NAME[:-len(".pth")] + ".safetensors")
    if path:
        where = [Path(path)]
    else:
        env = os.environ.get("DIFFTRAIN_INCEPTION")
        where = ([Path(env)] if env else []) + [default_cache_dir(cache_dir)]
    for w in where:
        if w.is_file():
            return w
        for n in names:
            if (w / n).is_file():
                return w / n
    looked = " or ".join(str(w if w.suffix else w / FILE_NAME) for w in where)
    raise FileNotFoundError(f"FID Inception weights not found at {looked}: download {URL} and copy it onto this "
                            f"machine, then pass 'inception:/path/to/{FILE_NAME}' or set $DIFFTRAIN_INCEPTION")


def build_inception(path: str | None = None, cache_dir: str | Path | None = None) -> InceptionExtractor:
    from difftrain.eval.inception import FIDInceptionV3

    net = FIDInceptionV3()
    net.load_weights(load_weights_file(find_inception(path, cache_dir)))
    return InceptionExtractor(net)


# ---------------------------------------------------------------------------------------- digits
class DigitsExtractor(Extractor):
    """The built-in digits classifier: 128-d penultimate features and 10-class logits."""

    name, num_classes = "digits", 10
    PREPROCESS = "luma601|bilinear-antialias16|x/127.5-1"

    def __init__(self, net: nn.Module):
        from difftrain.eval.digits_classifier import FEATURES

        super().__init__()
        self.dim = FEATURES
        self._hold(net, f"digits|{self.PREPROCESS}")

    def extract(self, images):
        from difftrain.eval.digits_classifier import preprocess

        features, logits = self.net(preprocess(images))
        return {"features": features, "logits": logits}


def build_digits(cache_dir: str | Path | None = None, style: str = "plain") -> DigitsExtractor:
    from difftrain.eval.digits_classifier import load_or_train

    return DigitsExtractor(load_or_train(default_cache_dir(cache_dir), style)[0])


# ----------------------------------------------------------------------------------------- build
def _digits(arg: str, cache_dir) -> Extractor:
    from difftrain.data.demo import STYLES

    if arg and arg not in STYLES:
        raise ValueError(f"extractor 'digits:{arg}': the style must be one of {', '.join(STYLES)}")
    return build_digits(cache_dir, arg or "plain")


def _inception(arg: str, cache_dir) -> Extractor:
    return build_inception(arg or None, cache_dir)


def _clip(arg: str, cache_dir) -> Extractor:
    return build_clip(arg)


# name (the spec before the first ':') -> builder(the rest of the spec, cache_dir); ``eval.extractor`` names one
EXTRACTORS: dict[str, Callable[[str, str | Path | None], Extractor]] = {
    "digits": _digits, "inception": _inception, "clip": _clip}


def build_extractor(spec: str, cache_dir: str | Path | None = None, device="cpu") -> Extractor:
    """``digits[:STYLE]`` | ``inception[:FILE]`` | ``clip:FOLDER`` | ``clip:open_clip:ARCH:FILE`` (module docstring);
    frozen, in eval mode, on ``device``."""
    kind, _, arg = spec.partition(":")
    if kind not in EXTRACTORS:
        raise ValueError(f"unknown extractor '{spec}': expected one of {', '.join(EXTRACTORS)} "
                         "(digits | inception[:FILE] | clip:FOLDER | clip:open_clip:ARCH:FILE)")
    return EXTRACTORS[kind](arg, cache_dir).to(device)
