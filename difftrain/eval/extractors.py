"""Feature extractors for sample-quality metrics (FID, KID, precision/recall, class accuracy, CLIP score).

Every extractor is an :class:`Extractor`: it takes uint8 images [N, H, W, C] (C = 1 or 3, any size),
does the preprocessing its network expects and returns ``{"features": float32 [N, dim]}``, plus
``"logits"`` [N, num_classes] for a classifier. Specs for :func:`build_extractor`:

``digits``
    A small CNN trained (seconds, cached) on the demo's scikit-learn digits; 128-d features and 10-class
    logits, so the demo's FID and class accuracy work offline (:mod:`difftrain.eval.digits_classifier`).
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

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$DIFFTRAIN_CACHE``, else ``~/.cache/difftrain``."""
    return Path(cache_dir or os.environ.get("DIFFTRAIN_CACHE") or Path.home() / ".cache" / "difftrain")


def weights_fingerprint(tensors: dict[str, torch.Tensor], tag: str) -> str:
    """16 hex digits of sha256 over ``tag`` and every tensor's name, dtype, shape and bytes (BatchNorm
    ``num_batches_tracked`` counters, unused in eval, are skipped)."""
    h = hashlib.sha256(tag.encode())
    for k in sorted(tensors):
        if k.endswith("num_batches_tracked"):
            continue
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"|{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


class Extractor(nn.Module):
    """uint8 images [N, H, W, C] -> ``{"features": float32 [N, dim]}`` (+ ``"logits"`` [N, num_classes]).

    Frozen: always in eval mode (``train()`` is a no-op), no gradients; inputs are moved to the device
    of the parameters and the outputs stay there. Subclasses implement :meth:`extract`.
    """

    name: str = ""
    dim: int = 0
    num_classes: int = 0
    fingerprint: str = ""

    def train(self, mode: bool = True):
        return super().train(False)

    def _freeze(self):
        self.requires_grad_(False)
        return self.eval()

    def _hold(self, net: nn.Module, tag: str) -> None:
        """Keep ``net`` (the weights behind the outputs) frozen, fingerprinted with the preprocessing ``tag``."""
        self.net = net
        self.fingerprint = weights_fingerprint(net.state_dict(), tag)
        self._freeze()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward(self, images) -> dict[str, torch.Tensor]:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{self.name} extractor: expected uint8 images [N, H, W, C] with C = 1 or 3, got "
                             f"{images.dtype} {list(images.shape)}")
        out = self.extract(images.to(self.device))
        return {k: v.float() for k, v in out.items()}

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, num_classes={self.num_classes}, fingerprint={self.fingerprint}"


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


def build_digits(cache_dir: str | Path | None = None) -> DigitsExtractor:
    from difftrain.eval.digits_classifier import load_or_train

    return DigitsExtractor(load_or_train(default_cache_dir(cache_dir))[0])


# ----------------------------------------------------------------------------------------- build
def build_extractor(spec: str, cache_dir: str | Path | None = None, device="cpu") -> Extractor:
    """``digits`` | ``inception[:FILE]`` | ``clip:FOLDER`` | ``clip:open_clip:ARCH:FILE`` (module docstring);
    frozen, in eval mode, on ``device``."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        ext = build_digits(cache_dir)
    elif kind == "inception":
        ext = build_inception(arg or None, cache_dir)
    elif kind == "clip":
        from difftrain.eval.clip import build_hf_clip, build_open_clip

        if not arg:
            raise ValueError(f"extractor '{spec}' needs a checkpoint: clip:FOLDER or clip:open_clip:ARCH:FILE")
        if arg.startswith("open_clip:"):
            arch, _, path = arg[len("open_clip:"):].partition(":")
            ext = build_open_clip(arch, path)
        else:
            ext = build_hf_clip(arg)
    else:
        raise ValueError(f"unknown extractor '{spec}': expected digits | inception[:FILE] | clip:FOLDER | "
                         "clip:open_clip:ARCH:FILE")
    return ext.to(device)
