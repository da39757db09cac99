"""The feature-extractor contract shared by every metric network (:mod:`difftrain.eval.extractors` builds them):
:class:`Extractor` (uint8 images in, ``{"features"[, "logits"]}`` out, frozen, fingerprinted), the weights
fingerprint, safe weight loading and the cache folder.
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
