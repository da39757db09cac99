"""The quantise-on-load export of a QAT run trained with a torchao scheme (``quant/torchao_scheme.py``):
``difftrain export RUN --out DIR`` writes the full-precision QAT weights (trained through torchao's fake quantizers,
not folded) as a normal diffusers folder at ``DIR/torchao/``, and in ``DIR/difftrain.json`` (key ``torchao``) the
``from_pretrained`` call that quantises them on load with diffusers' ``TorchAoConfig``:

    import torch
    from diffusers import DiTTransformer2DModel, TorchAoConfig
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    model = DiTTransformer2DModel.from_pretrained("DIR/torchao", torch_dtype=torch.float32,
        quantization_config=TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
                                          modules_to_not_convert=["proj_out_2"]))

torchao computes on load the integers our convert folds (the same PTQ config, whose QAT numerics the run trained
with), so the loaded model is the run's converted model. ``DIR`` itself stays what every export writes (the served,
converted model, or what the integer export decides for activation quantisers); ``DIR/torchao/`` is the extra
folder. ``config.json`` holds no ``quantization_config`` (diffusers would read the folder as already quantised,
and torchao's quantised tensors only serialise by pickle, diffusers#10470): the quantisation is in the call.

Why each argument:
- ``torch_dtype=torch.float32``: without it diffusers casts a torchao load to bfloat16 first, which rounds the
  weights and changes some integers; the run trained its fake quantizers on float32 weights.
- ``modules_to_not_convert``: diffusers quantises every ``nn.Linear``; the run left some in float (the output layer,
  layers outside ``targets``). Those names (diffusers' module names) are listed, and checked here against diffusers'
  own matching rule (a name matches a parameter that contains it followed by '.') so that exactly the run's
  quantised layers are quantised on load.
- What cannot be expressed is an ``ExportError``: a quantised Conv2d (diffusers' TorchAoConfig quantises Linear layers
  only: train a UNet's torchao scheme with Linear targets, or use the integer export), a change kept beside the base.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from difftrain.models.dit_export import ExportError

FOLDER = "torchao"


def _diffusers_names(model: nn.Module, layers: list[str]) -> dict[str, list[list[str]]]:
    """Our quantised layer -> the diffusers modules holding its weight: copies, each a list of the modules holding its
    row blocks in order (a DiT's fused qkv is three Linears; its t embedder has one copy per block; a UNet's modules
    are diffusers' own, under ``inner.``)."""
    from difftrain.models.dit import DiT
    from difftrain.models.dit_export import key_map
    from difftrain.models.unet import UNet

    if isinstance(model, UNet):
        return {n: [[n.removeprefix("inner.")]] for n in layers}
    if isinstance(model, DiT):
        rows = key_map(model.config)
        return {n: [[d.removesuffix(".weight") for d in dsts] for dsts, src in rows if src == f"{n}.weight"]
                for n in layers}
    raise ExportError(f"the torchao export knows the DiT and the UNet, not a {type(model).__name__}")


def _not_converted(folder: Path, cls_name: str, quantised: set[str]) -> list[str]:
    """diffusers' Linear modules of the written folder that are not in ``quantised``: ``modules_to_not_convert``,
    checked to leave exactly ``quantised`` to TorchAoConfig under diffusers' matching rule."""
    import diffusers

    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        dmodel = getattr(diffusers, cls_name).from_config(config)
    linears = {n for n, m in dmodel.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(quantised - linears)
    if missing:
        raise ExportError(f"the torchao export: {missing[0]} of {cls_name} is not an nn.Linear, which TorchAoConfig "
                          "would leave in float")
    keep = sorted(linears - quantised)
    on_load = {n for n in linears if not any(k + "." in n + ".weight" or k == n + ".weight" for k in keep)}
    if on_load != quantised:  # diffusers matches by substring: a kept name inside a quantised one
        wrong = sorted(on_load ^ quantised)[0]
        raise ExportError(f"the torchao export: TorchAoConfig's modules_to_not_convert cannot single out "
                          f"{cls_name}'s {wrong} (diffusers matches names by substring)")
    return keep


def export_torchao(model: nn.Module, changes: list, out_dir: str | Path) -> dict | None:
    """Write ``DIR/torchao/`` from the *prepared* (unmerged) ``model`` of a QAT run with a torchao scheme and return
    the ``difftrain.json`` entry (the call, torchao's JSON form of its config, the modules left in float, our
    quantised layers' diffusers modules), or ``{"not_written": why}`` where the run cannot be expressed (an
    ``ExportError``'s line; the rest of the export goes on, as a LoRA export's ``not_written`` does); None when no
    change of the run is a torchao-scheme qat. An earlier export's ``DIR/torchao/`` is removed first."""
    from difftrain.quant.qat import QAT

    folder = Path(out_dir) / FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # rewritten below, or stale
    qat = next((c for c in changes if isinstance(c, QAT) and c.args.scheme != "lsq"), None)
    if qat is None:
        return None
    try:
        return _write(model, changes, qat, folder)
    except ExportError as e:
        shutil.rmtree(folder, ignore_errors=True)
        return {"scheme": qat.args.scheme, "not_written": str(e)}


def _write(model: nn.Module, changes: list, qat, folder: Path) -> dict:
    from difftrain.quant.modules import Quantised
    from difftrain.quant.torchao_scheme import TorchaoWeightQuant, base_config, config_source

    others = [c for c in changes if c is not qat]
    beside = next((c for c in others if not c.mergeable), None)
    if beside is not None:
        raise ExportError(f"the torchao export writes the base model only: {beside.key} ({beside.kind}) keeps modules "
                          "beside it")
    if others:  # e.g. QALoRA's adapter: merged into the full-precision weight that torchao will quantise
        model = copy.deepcopy(model)
        for c in reversed(others):
            c.merge(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, Quantised)
              and isinstance(m.weight_quant, TorchaoWeightQuant)]
    conv = next((n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)), None)
    if conv is not None:
        raise ExportError(f"the torchao export: {qat.key} quantised the Conv2d {conv}, and diffusers' TorchAoConfig "
                          "quantises nn.Linear layers only; train with Linear targets (e.g. [attn, modulation]) or "
                          "serve the integer export")
    names = _diffusers_names(model, layers)
    state = {k: v.detach() for k, v in model.state_dict().items()}  # the quantisers hold no state: the base's keys
    cls_name = model.save_diffusers(state, folder)
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:  # diffusers would read the folder as quantised already
        raise ExportError(f"the torchao export: {folder / 'config.json'} has a quantization_config")
    keep = _not_converted(folder, cls_name, {d for copies in names.values() for ds in copies for d in ds})
    from torchao.core.config import config_to_dict

    imports, expr = config_source(qat.args)
    call = (f"{cls_name}.from_pretrained({str(folder.resolve())!r}, torch_dtype=torch.float32, "
            f"quantization_config=TorchAoConfig({expr}, modules_to_not_convert={keep!r}))")
    return {"folder": FOLDER, "scheme": qat.args.scheme, "diffusers_class": cls_name,
            "imports": f"import torch\nfrom diffusers import {cls_name}, TorchAoConfig\n{imports}", "call": call,
            "quant_type": config_to_dict(base_config(qat.args)), "modules_to_not_convert": keep,
            "quantised": names}
