"""A small loader for serving a QAT run's integer export (``quant/export.py``): :func:`load_quantized` builds our
architecture from the export's ``difftrain.json`` (``arch`` + ``model``), turns each layer ``quant_config.json``
names into an integer layer and loads ``quantized/model.safetensors`` strictly (every tensor used, none missing).

An integer layer keeps its class's forward (``modules.Quantised``: the input through ``act_quant``, then the
Linear / Conv2d) and holds its weight as the stored integers: buffers ``weight_int`` (packed two per byte at ≤ 4
bits), ``weight_scale`` and, asymmetric, ``weight_zero``. Its ``weight`` is dequantised, s · (k − z), at every
forward: the model keeps the integers' bytes in memory (a W4 model's weights take about an eighth of float32's)
and pays an unpack and a multiply per layer call. The values are convert's (``modules.fold``) to the bit, so the
served model's outputs equal the converted run's. There is no integer kernel here: the matmuls run in float.

Activation quantisers are rebuilt from their spec (``modules.ActQuant(**spec, clock=..., key=...)``) and loaded
from the file; a timestep-aware export (``clock``) gets one :class:`~difftrain.quant.modules.TimeContext` filled by a
forward pre-hook on the model, as ``QAT.apply`` registers it, so the model must be called as ``model(x_t, t, cond)``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn

from difftrain.models.dit_export import ExportError
from difftrain.quant.export import CONFIG, FOLDER, FORMAT, VERSION, WEIGHTS, unpack
from difftrain.quant.modules import ActQuant, Quantised, TimeContext


class IntegerWeight:
    """Mixed into a Linear's / Conv2d's class before :class:`Quantised`: ``weight`` is s · (k − z) of the stored
    integers, reshaped to the layer's weight shape (``weight_quant`` is None, so ``Quantised`` uses it as is)."""

    @property
    def weight(self) -> torch.Tensor:
        bits, symmetric = self.weight_spec["bits"], self.weight_spec["symmetric"]
        k = unpack(self.weight_int, self.grouped_shape, bits, symmetric)
        z = self.weight_zero.float() if self.weight_zero is not None else 0.0
        return (self.weight_scale * (k - z)).reshape(self.weight_shape)


_CLASSES: dict[type, type] = {}


def integer_layer(layer: nn.Module, entry: dict, tensors: dict[str, torch.Tensor], name: str,
                  act: ActQuant | None) -> None:
    """Swap ``layer`` (a plain Linear / Conv2d) for its integer class in place: its float weight dropped, the
    stored integers, step sizes and zero points registered as buffers (this file's tensors, on the layer's device;
    ``KeyError`` where one is missing)."""
    cls = type(layer)
    if cls.__name__ != entry["class"]:
        raise ExportError(f"'{name}' is a {cls.__name__} in the architecture, a {entry['class']} in the export")
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Integer{cls.__name__}", (IntegerWeight, Quantised, cls), {})
    device = layer.bias.device if layer.bias is not None else layer.weight.device
    del layer.weight
    layer.weight_spec, layer.weight_shape = entry["weight"], tuple(entry["shape"])
    layer.grouped_shape = tuple(entry["grouped"])
    for buf in ("weight_int", "weight_scale", "weight_zero"):  # no weight_zero: symmetric (z = 0)
        needed = buf != "weight_zero" or not entry["weight"]["symmetric"]
        t = tensors.get(f"{name}.{buf}")
        if needed and t is None:
            raise KeyError(f"no tensor {name}.{buf}")
        layer.register_buffer(buf, t.to(device) if needed else None)
    layer.weight_quant, layer.act_quant = None, act
    layer.__class__ = _CLASSES[cls]


def read_quantized(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``quant_config.json``, the tensors of ``model.safetensors``) of ``folder/quantized``, checked: a missing,
    unreadable, corrupt or replaced file is an ``ExportError`` naming it."""
    q = Path(folder) / FOLDER
    path = q / CONFIG
    try:
        config = json.loads(path.read_text())
        if config.get("format") != FORMAT or config.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} config")
        layers = config["layers"]
        path = q / WEIGHTS  # a fixed name: the JSON never points elsewhere
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != config["sha256"]:
            raise ValueError(f"its sha256 differs from {CONFIG}'s (corrupt or replaced)")
        tensors = load(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise ExportError(f"cannot read the quantized export's {path}: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}") from None
    if not isinstance(layers, dict):
        raise ExportError(f"cannot read the quantized export's {q / CONFIG}: 'layers' is not a mapping")
    return config, tensors


@torch.no_grad()
def load_quantized(folder: str | Path, device: torch.device | str | None = None) -> nn.Module:
    """The served model of a QAT export folder (``difftrain export RUN --out DIR`` on a QAT run: ``DIR``), in eval
    mode with no gradients, on ``device`` (default: CUDA if present)."""
    from difftrain.models import registry

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(folder)
    try:
        meta = json.loads((folder / "difftrain.json").read_text())
        arch, acfg = meta["arch"], registry.arch_class(meta["arch"]).config_class(**meta["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read {folder / 'difftrain.json'}: {type(e).__name__}: {e}") from None
    config, tensors = read_quantized(folder)
    model = registry.materialize(registry.build(arch, acfg), device, seed=0)
    clock = None
    if config["clock"]:
        clock = TimeContext()
        model.register_forward_pre_hook(clock.hook, with_kwargs=True)
    for name, entry in config["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{folder / FOLDER / CONFIG} names layer '{name}', which the architecture "
                              f"{arch} lacks") from None
        try:
            act = ActQuant(**entry["act"], clock=clock, key=config["key"]).to(device) if entry["act"] else None
            integer_layer(layer, entry, tensors, name, act)
        except (KeyError, TypeError) as e:
            raise ExportError(f"{folder / FOLDER}: {CONFIG} and {WEIGHTS} disagree on layer '{name}' "
                              f"({type(e).__name__}: {e})") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor of another shape: torch's message lists each on its own line
        lines = [ln.strip() for ln in str(e).splitlines() if "mismatch" in ln] or [str(e).splitlines()[0]]
        raise ExportError(f"{folder / FOLDER / WEIGHTS} does not match the architecture: {lines[0]}") \
            from None
    if missing or unexpected:
        raise ExportError(f"{folder / FOLDER / WEIGHTS} does not match the architecture: missing "
                          f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return model.requires_grad_(False).eval()
