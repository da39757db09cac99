"""Control images (ControlNet's / T2I-Adapter's condition), computed from a sample's own image by a named
transform; ``data.control`` picks one of :data:`CONTROLS` (or ``member``: read from the shards, in
:mod:`difftrain.data.samples`).

A transform ``fn(image) -> image`` gets the sample's decoded image, already cropped, resized and flipped
for its bucket, as a uint8 numpy array [h, w, C] (``C = data.channels``), and returns an image of the
same size: a uint8 (or bool) array [h, w] or [h, w, C'], or a PIL image. The loader converts the result to
``data.channels`` as it does images (:func:`~difftrain.data.images.to_mode`), so the batch's ``control``
has the shape, dtype and layout of its ``pixels``. Computing on the decoded image keeps control and image
aligned under any crop or flip at no extra cost, and a transform runs on bucket-size pixels only.

Register your own before the config is read (the name becomes a valid ``data.control``), e.g. in a launch
script used in place of ``-m difftrain`` (``torchrun ... train_mine.py train CONFIG``)::

    import functools
    from difftrain.cli import main
    from difftrain.data.control import blur, register_control

    register_control("depth", my_depth_fn)  # uint8 [h, w, C] -> same-size image
    register_control("blur4", functools.partial(blur, sigma=4.0))
    main()

Built in (deterministic, numpy and PIL on the CPU):

| name      | image                                                                                     |
| --------- | ----------------------------------------------------------------------------------------- |
| edges     | white where the luma's Sobel gradient magnitude exceeds ``threshold`` (0.2) x a full step |
| blur      | Gaussian blur of ``sigma`` px (default: the shorter side / 32, at least 1)                 |
| grayscale | ITU-R 601-2 luma (PIL's ``convert("L")``)                                                  |
"""
from __future__ import annotations

from typing import Callable

import numpy as np

CONTROLS: dict[str, Callable] = {}
SPECIAL = ("", "member")  # none; each sample's control.<ext> member


def register_control(name: str, fn: Callable) -> None:
    """Make ``fn`` (uint8 [h, w, C] numpy -> same-size image) the control transform ``data.control=name``."""
    if not isinstance(name, str) or not name or name in SPECIAL:
        raise ValueError(f"a control transform needs a name other than {', '.join(map(repr, SPECIAL))}, got {name!r}")
    if not callable(fn):
        raise ValueError(f"control transform '{name}' must be callable, got {type(fn).__name__}")
    CONTROLS[name] = fn


def control_choices() -> tuple[str, ...]:
    """The valid values of ``data.control`` (read when a config is checked, so registered ones count)."""
    return (*SPECIAL, *CONTROLS)


def check_control(name: str, kind: str = "image") -> Callable | None:
    """``data.control`` -> its transform (None for "" and "member"); ValueError naming the key otherwise."""
    if name not in control_choices():
        raise ValueError(f"config key 'data.control' = {name!r} is not one of: "
                         + ", ".join(repr(c) if c == "" else c for c in control_choices()))
    if name and kind != "image":
        raise ValueError(f"config key 'data.control' = {name!r} needs data.kind=image (control images for "
                         f"{kind} data are not supported)")
    return CONTROLS.get(name)


def _luma(a: np.ndarray) -> np.ndarray:
    """uint8 [h, w, C] -> uint8 [h, w]: ITU-R 601-2 luma for RGB (PIL's ``convert("L")``), as is for gray."""
    from PIL import Image

    return a[..., 0] if a.shape[-1] == 1 else np.asarray(Image.fromarray(np.ascontiguousarray(a)).convert("L"))


def sobel(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3x3 Sobel operator (Sobel & Feldman, "A 3x3 isotropic gradient operator for image processing", 1968):
    ``Gx = [1, 2, 1]^T [-1, 0, 1] * y`` and ``Gy`` its transpose, borders repeated; int32, unnormalised, equal to
    ``scipy.ndimage.sobel(y, axis=1 | 0, mode="nearest")``, in separable slices."""
    p = np.pad(y.astype(np.int32), 1, mode="edge")
    sx = p[:-2] + 2 * p[1:-1] + p[2:]  # smoothed down the columns
    sy = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # ... along the rows
    return sx[:, 2:] - sx[:, :-2], sy[2:] - sy[:-2]


def edges(a: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """A binary edge map, white edges on black as ControlNet's edge conditions: white where the Sobel gradient
    magnitude ``sqrt(Gx^2 + Gy^2)`` of the luma exceeds ``threshold`` x 1020, the operator's response to a
    black-to-white step (4 x 255). Canny's detector (Canny 1986; ControlNet's edge model used it) would also
    thin and link these edges; it needs scikit-image or OpenCV, which difftrain does not depend on."""
    gx, gy = sobel(_luma(a))
    return np.where(gx * gx + gy * gy > (threshold * 4 * 255) ** 2, 255, 0).astype(np.uint8)


def blur(a: np.ndarray, sigma: float | None = None):
    """Gaussian blur with standard deviation ``sigma`` px (default: the shorter side / 32, at least 1): PIL's
    ``ImageFilter.GaussianBlur``, three extended box filters (Gwosdek et al., "Theoretical foundations of Gaussian
    convolution by extended box filtering", SSVM 2011), whose cost does not grow with ``sigma``."""
    from PIL import Image, ImageFilter

    s = float(sigma) if sigma is not None else max(1.0, min(a.shape[:2]) / 32)
    img = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))
    return img.filter(ImageFilter.GaussianBlur(s))


def grayscale(a: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, ``L = (299 R + 587 G + 114 B) / 1000`` (PIL's ``convert("L")``)."""
    return _luma(a)


def apply_control(fn: Callable, name: str, x, channels: int):
    """``fn`` on the decoded image ``x`` (uint8 [C, h, w], channels innermost as :class:`ImageTransform` gives it)
    -> the control image in the same shape, dtype and layout; ValueError when ``fn`` breaks the contract."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from difftrain.data.images import to_mode

    h, w = x.shape[-2:]
    out = fn(x.permute(1, 2, 0).numpy())  # [h, w, C], a view: no copy
    if isinstance(out, torch.Tensor):
        raise ValueError(f"control transform '{name}' returned a torch tensor: return a numpy array or PIL image")
    if not isinstance(out, Image.Image):
        out = np.asarray(out)
        if out.dtype == bool:
            out = out.astype(np.uint8) * 255
        if out.dtype != np.uint8 or out.ndim not in (2, 3) or (out.ndim == 3 and out.shape[2] not in (1, 3, 4)):
            raise ValueError(f"control transform '{name}' must return a uint8 [h, w] or [h, w, 1|3|4] array or a "
                             f"PIL image, got {out.dtype} of shape {out.shape}")
        out = Image.fromarray(out[..., 0] if out.ndim == 3 and out.shape[2] == 1 else out)
    if out.size != (w, h):
        raise ValueError(f"control transform '{name}' returned {out.size[0]}x{out.size[1]} px for a {w}x{h} px "
                         "image: a control image must keep its image's size")
    return TF.pil_to_tensor(to_mode(out, channels))  # uint8 [C, h, w], channels innermost like the pixels


for _name, _fn in (("edges", edges), ("blur", blur), ("grayscale", grayscale)):
    register_control(_name, _fn)
