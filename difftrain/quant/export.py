"""The integer export of a QAT run (issue 18, must-have 5): ``DIR/quantized/model.safetensors`` and
``DIR/quantized/quant_config.json``, written from the PREPARED model (its layers still hold their weight quantisers;
convert, ``modules.fold``, would leave only the dequantised weights s · (k − z)).

Per quantised layer NAME the file holds ``NAME.weight_int`` (the integers k of ``fake.to_ints`` on the layer's
``fake.grouped`` weight, in the shape [out, groups, size]; :func:`pack`), ``NAME.weight_scale`` (the step sizes s,
float32, [out, groups, 1]), ``NAME.weight_zero`` (asymmetric only: the rounded zero points z, int32), ``NAME.bias``
and ``NAME.act_quant.*`` (the activation quantiser's state dict, when it has one); every other tensor of the model
as it is. These are the keys of the model ``serve.load_quantized`` builds, so it loads the file strictly. The JSON
names each layer with its class, weight shape, weight spec (``WeightQuant.spec``), storage and activation spec
(``ActQuant.spec``, None without one), and the file's sha256. safetensors and JSON only: no pickle.

Storage of k: b ≤ 4 bits two values per byte (``uint4x2``: k − q_min in each nibble, low nibble first, so a W4 weight
takes half a byte), otherwise the smallest integer dtype holding [q_min, q_max] (int8 for a signed 8-bit range,
uint8 for an unsigned one).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from difftrain.models.dit_export import ExportError
from difftrain.quant.fake import EPS, grouped, int_range, to_ints
from difftrain.quant.modules import ActQuant, Quantised, WeightQuant

FORMAT = "difftrain-quantized"
VERSION = 1
FOLDER, WEIGHTS, CONFIG = "quantized", "model.safetensors", "quant_config.json"
PACKED = "uint4x2"


def storage(bits: int, symmetric: bool) -> str:
    """How k of a ``bits``-bit (a)symmetric weight is stored: ``uint4x2`` (two per byte) or a torch dtype's name."""
    if bits <= 4:
        return PACKED
    qmin, qmax = int_range(bits, symmetric)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return str(dtype).removeprefix("torch.")
    raise ExportError(f"no integer dtype holds {bits}-bit weights")  # unreachable: bits <= 16


def pack(k: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The integers k (a float tensor of whole numbers in [q_min, q_max]) in their :func:`storage`: for ``uint4x2``
    a flat uint8 tensor of ⌈n / 2⌉ bytes, byte i = u[2i] | u[2i+1] << 4 with u = k − q_min (a zero nibble pads an odd
    count); otherwise k in its dtype, shape kept."""
    how = storage(bits, symmetric)
    if how != PACKED:
        return k.to(getattr(torch, how))
    u = (k.flatten() - int_range(bits, symmetric)[0]).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack(stored: torch.Tensor, shape: tuple[int, ...], bits: int, symmetric: bool) -> torch.Tensor:
    """:func:`pack`'s inverse: k as float32 in ``shape``."""
    if storage(bits, symmetric) != PACKED:
        return stored.float().reshape(shape)
    u = torch.stack([stored & 0xF, stored >> 4], -1).flatten()
    return (u[:math.prod(shape)].float() + int_range(bits, symmetric)[0]).reshape(shape)


def quantised_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s quantised layers by name; ``ExportError`` where one has quantisers other than ours (a torchao
    scheme's), is already folded (convert ran: the step sizes are gone) or was never calibrated."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Quantised)}
    for n, m in layers.items():
        other = [q for q in (m.weight_quant, m.act_quant) if q is not None and not isinstance(q, (WeightQuant,
                                                                                                  ActQuant))]
        if other:
            raise ExportError(f"layer {n}'s {type(other[0]).__name__} is not an LSQ quantiser: the integer export is "
                              "for qat's scheme lsq")
        if m.weight_quant is None:
            raise ExportError(f"layer {n}'s weights are already folded (convert ran): the integer export reads the "
                              "prepared model (load_run(..., merge=False))")
        if m.act_quant is not None and not int(m.act_quant.calibrated):
            raise ExportError(f"layer {n}'s activation step sizes were never calibrated (no training forward ran)")
    return layers


@torch.no_grad()
def save_quantized(model: nn.Module, folder: str | Path, meta: dict) -> dict:
    """Write ``folder/quantized/`` (the module docstring's layout) from a prepared QAT ``model``; ``meta`` (what the
    export says about its source, e.g. the step) is recorded in the JSON as is. Returns the summary the export's
    ``difftrain.json`` keeps under ``quantized`` (its sha256 makes the export's fingerprint change with the file)."""
    layers = quantised_layers(model)
    if not layers:
        raise ExportError("the model has no quantised layer: nothing for the integer export")
    state = model.state_dict()
    tensors, entries, int_bytes, float_bytes = {}, {}, 0, 0
    for name, m in layers.items():
        wq, w = m.weight_quant, m.weight.detach()
        spec = dict(wq.spec)
        v = grouped(w, spec["granularity"], spec["group_size"])
        scale, zero = wq.scale.detach(), wq.zero.detach() if wq.zero is not None else None
        k = to_ints(v, scale, zero, wq.qmin, wq.qmax)  # convert's fold: s · (k − z) with these k, s and z
        tensors[f"{name}.weight_int"] = pack(k, spec["bits"], spec["symmetric"])
        tensors[f"{name}.weight_scale"] = scale.clamp_min(EPS).float()
        if wq.zero is not None:
            tensors[f"{name}.weight_zero"] = torch.round(zero).to(torch.int32)
        int_bytes += sum(tensors[f"{name}.{t}"].nbytes for t in ("weight_int", "weight_scale", "weight_zero")
                         if f"{name}.{t}" in tensors)
        float_bytes += w.numel() * 4
        aq = m.act_quant
        entries[name] = {"class": "Conv2d" if isinstance(m, nn.Conv2d) else "Linear", "shape": list(w.shape),
                         "grouped": list(k.shape), "weight": spec,
                         "storage": storage(spec["bits"], spec["symmetric"]),
                         "act": dict(aq.spec) if aq is not None else None}
    skip = tuple(f"{n}.weight_quant." for n in layers)
    for key, t in state.items():
        if key.startswith(skip) or (key.endswith(".weight") and key[:-len(".weight")] in layers):
            continue
        tensors[key] = t.detach()
    tensors = {k: t.to("cpu").contiguous().clone() for k, t in tensors.items()}
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
    (out / WEIGHTS).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    acts = [m.act_quant for m in layers.values() if m.act_quant is not None]
    config = {**meta, "format": FORMAT, "version": VERSION, "weights": WEIGHTS, "sha256": digest,
              "clock": any(a.clock is not None for a in acts),  # timestep-aware: t from the model's forward
              "key": acts[0].key if acts else None,  # the qat entry's config key (named in load errors)
              "layers": entries}
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    return {"folder": FOLDER, "sha256": digest, "layers": len(layers), "activations": bool(acts),
            "weight_bits": sorted({e["weight"]["bits"] for e in entries.values()}),
            "weight_bytes": int_bytes, "float32_weight_bytes": float_bytes}


def lsq(change) -> bool:
    """Whether ``change`` is a qat entry with our quantisers (``scheme: lsq``), whose integers this export writes; a
    torchao scheme's export is torchao's quantise-on-load (``quant/torchao_export.py``)."""
    return change.kind == "qat" and getattr(change.args, "scheme", "lsq") == "lsq"


def export_qat(model: nn.Module, changes: list, folder: str | Path, meta: dict) -> tuple[dict | None, list]:
    """``difftrain export``'s integer export of a run with a ``qat`` change (:func:`lsq`), from its prepared
    ``model``: the changes applied after qat (QALoRA's adapters, which add into the weight inside the quantiser) are
    merged first, in ``merge_changes``' reverse order, so the integers are those of the weight the quantiser saw;
    then :func:`save_quantized`. Returns (its summary, None without qat; the changes still to merge: qat's convert
    and those before it). Without qat an earlier export's ``quantized/`` in ``folder`` is removed (it is stale)."""
    from difftrain.finetune.adapt import merge_changes

    i = next((i for i, c in enumerate(changes) if lsq(c)), None)
    if i is None:
        import shutil

        shutil.rmtree(Path(folder) / FOLDER, ignore_errors=True)  # an earlier export's into the same folder
        return None, changes
    beside = [a for a in ("control", "adapter") if getattr(model, a, None) is not None]
    if beside:
        raise ExportError(f"cannot export the integers of a qat run with a module beside the base (model.{beside[0]}: "
                          "a ControlNet or T2I-Adapter): not built yet")
    merge_changes(model, changes[i + 1:])
    return save_quantized(model, folder, meta), changes[:i + 1]


def no_diffusers_root(changes: list, pipeline: bool) -> str | None:
    """Why ``difftrain export`` writes no diffusers model at the export's root (its served model keeps activation
    quantisers, which no diffusers class holds: the root would be another model), or None (it writes one).
    ``ExportError`` for ``--pipeline`` then: a stock pipeline would serve that other model."""
    qat = next((c for c in changes if c.kind == "qat" and c.args.act_bits), None)
    if qat is None:
        return None
    served = ("the integer export in DIR/quantized, served by difftrain sample/eval" if lsq(qat) else
              "DIR/torchao, quantised on load by diffusers' TorchAoConfig")
    if pipeline:
        raise ExportError(f"cannot export a pipeline folder: {qat.key} quantises activations (act_bits="
                          f"{qat.args.act_bits}), which no diffusers pipeline holds; export without --pipeline ({served})")
    return (f"none: {qat.key} quantises activations (act_bits={qat.args.act_bits}), which no diffusers model holds; "
            f"the served model is {served}")


def export_quantised(model: nn.Module, changes: list, out: str | Path, pipeline: bool, step: int):
    """``difftrain export``'s part for a QAT run, from the *prepared* ``model`` (before anything merges): a torchao
    scheme's full-precision weights in ``DIR/torchao`` with the call that quantises them on load
    (``quant/torchao_export.py``), our scheme's integers in ``DIR/quantized`` (:func:`export_qat`). Returns
    (``difftrain.json`` entries, the changes still to merge, why no root diffusers model is written or None, the
    lines to print)."""
    from difftrain.quant.torchao_export import export_torchao

    no_root = no_diffusers_root(changes, pipeline)
    torchao = export_torchao(model, changes, out)  # None: no torchao scheme (a stale DIR/torchao removed)
    quantized, left = export_qat(model, changes, out, {"step": step})
    meta, lines = {}, []
    if torchao:
        meta["torchao"] = torchao
        lines.append(f"no torchao folder written: {torchao['not_written']}" if "not_written" in torchao else
                     f"torchao ({torchao['scheme']}) in {Path(out) / torchao['folder']}, quantised on load:\n"
                     f"{torchao['imports']}\nmodel = {torchao['call']}")
    if quantized:  # difftrain sample/eval serve DIR/quantized (quant/serve.py)
        q = meta["quantized"] = dict(quantized, root=no_root or "the same model: its dequantised weights s·(k − z)")
        lines.append(f"integer weights (W{'/'.join(map(str, q['weight_bits']))}, {q['layers']} layers, "
                     f"{q['float32_weight_bytes'] / q['weight_bytes']:.2f}x smaller than their float32 weights) in "
                     f"{Path(out) / q['folder']}: difftrain sample/eval serve them, as does "
                     f"difftrain.quant.serve.load_quantized({str(out)!r}); root diffusers model: {q['root']}")
    elif no_root:  # a torchao scheme with activations: DIR/torchao is the served model
        meta["served"] = no_root
        lines.append(f"root diffusers model: {no_root}")
    return meta, left, no_root, lines
