"""A small CNN trained on the demo's digits, so FID and class accuracy of the demo work offline.

It sees the pixels the demo data set holds (:func:`difftrain.data.demo.digit_arrays` +
:func:`~difftrain.data.demo.upsample`: scikit-learn's 8x8 digits scaled to 0..255 and bicubically
up-sampled to 16 px) and trains on the training split of ``write_digits``' default split
(``val_fraction=0.1``, ``seed=0``), never on the held-out images. Training is seeded, uses
deterministic algorithms on one CPU thread, light augmentation (random shifts of up to 2 px) and takes
a few seconds (99.4% held-out accuracy). The weights are cached as safetensors under a name that
contains a hash of :data:`RECIPE`, so a changed recipe never loads stale weights. Another ``style`` of the demo
data (:data:`difftrain.data.demo.STYLES`, e.g. ``bold``) gets its own classifier, trained the same way on that
style's training split (the extractor ``digits:bold``), so FID and class accuracy of a model fine-tuned to the
style are measured by a network that has seen it.

Features are the 128-d penultimate layer (after its ReLU), in the spirit of the Inception pool3
features of FID (Heusel et al. 2017); logits are for the 10 digit classes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 16
FEATURES = 128
RECIPE = {"arch": "conv32-conv64-fc128-v1", "size": SIZE, "val_fraction": 0.1, "split_seed": 0, "seed": 0,
          "epochs": 8, "batch": 64, "lr": 2e-3, "weight_decay": 1e-4, "max_shift": 2}


def recipe_hash(style: str = "plain") -> str:
    recipe = RECIPE if style == "plain" else {**RECIPE, "style": style}  # plain: the hash it always had
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


class DigitsNet(nn.Module):
    """float [N, 1, 16, 16] in [-1, 1] -> (features [N, 128], logits [N, 10])."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.head(f)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] (C = 1 or 3) -> float [N, 1, 16, 16] in [-1, 1]: RGB to luma (ITU-R 601, as
    PIL's ``convert("L")``), bilinear antialiased resize when not 16 px, then ``x / 127.5 - 1``."""
    x = images.permute(0, 3, 1, 2).float().contiguous()
    if x.shape[1] == 3:
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


def digit_split(split: str, style: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's 16 px digits of ``split`` ("train" | "val") in ``style``: (uint8 [N, 16, 16, 1], labels [N])."""
    from difftrain.data.demo import digit_arrays, render

    images, labels, num_val = digit_arrays(RECIPE["val_fraction"], RECIPE["split_seed"])
    part = slice(0, num_val) if split == "val" else slice(num_val, None)
    pixels = np.stack([render(p, SIZE, style) for p in images[part]])[..., None]
    return torch.from_numpy(pixels), torch.from_numpy(labels[part]).long()


def _shift(x: torch.Tensor, g: torch.Generator, m: int) -> torch.Tensor:
    """Shift each image by a random integer offset in [-m, m]^2, filling with background (-1)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (m, m, m, m), value=-1.0)
    dy, dx = (torch.randint(0, 2 * m + 1, (2, n), generator=g))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return pad[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(style: str = "plain") -> DigitsNet:
    """Train :class:`DigitsNet` by :data:`RECIPE` on the CPU (seconds), on the training split drawn in ``style``."""
    r = RECIPE
    images, labels = digit_split("train", style)
    x = preprocess(images)
    was_det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # the same weights whatever the core count; tiny ops gain nothing from threads
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r["seed"])
            net = DigitsNet()
        g = torch.Generator().manual_seed(r["seed"])
        opt = torch.optim.AdamW(net.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        steps = r["epochs"] * -(-len(x) // r["batch"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=steps)
        net.train()
        for _ in range(r["epochs"]):
            order = torch.randperm(len(x), generator=g)
            for lo in range(0, len(x), r["batch"]):
                idx = order[lo:lo + r["batch"]]
                loss = F.cross_entropy(net(_shift(x[idx], g, r["max_shift"]))[1], labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(threads)
    return net.eval()


def load_or_train(cache_dir: Path, style: str = "plain") -> tuple[DigitsNet, Path]:
    """The cached classifier ``cache_dir/digits_classifier-<recipe hash>.safetensors`` (another style:
    ``digits_classifier-STYLE-<hash>``), trained and cached (atomically, so concurrent ranks never read a partial
    file) when absent."""
    from safetensors.torch import load_file, save_file

    name = "digits_classifier" if style == "plain" else f"digits_classifier-{style}"
    path = Path(cache_dir) / f"{name}-{recipe_hash(style)}.safetensors"
    net = DigitsNet()
    if path.is_file():
        net.load_state_dict(load_file(str(path)), strict=True)
        return net.eval(), path
    net = train(style)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"recipe": json.dumps(RECIPE, sort_keys=True), "style": style})
    os.replace(tmp, path)
    return net, path
