"""The modules a served model keeps beside its base (changes that do not merge: a ControlNet's branch
``model.control``, a T2I-Adapter ``model.adapter``): ``difftrain export`` writes the base as the plain architecture
and each of them in its own folder (:func:`save_served`); ``difftrain sample EXPORT`` adds them back
(:func:`load_served`). An earlier export's folder for a module this model lacks is removed, so an export folder
never serves a stale branch."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def _beside():
    """(attribute, export folder, writer, reader) of each kind of module kept beside the base."""
    from difftrain.finetune.controlnet_export import export_controlnet, load_controlnet
    from difftrain.finetune.t2i_adapter import export_adapter, load_adapter

    return (("control", "controlnet", export_controlnet, load_controlnet),
            ("adapter", "t2i_adapter", export_adapter, load_adapter))


def save_served(model, state: dict[str, torch.Tensor], out_dir: str | Path) -> tuple[str, str | None]:
    """``model.save_diffusers`` of the served model's ``state`` with the modules beside the base detached, then each
    of them written by its own writer. Returns (the diffusers class, the lines saying what was written beside the
    base, or None)."""
    held = {}
    for attr, folder, _, _ in _beside():
        if getattr(model, attr, None) is not None:
            held[attr] = getattr(model, attr)
            delattr(model, attr)
        else:
            shutil.rmtree(Path(out_dir) / folder, ignore_errors=True)
    try:
        cls_name = model.save_diffusers({k: v for k, v in state.items() if k.split(".")[0] not in held}, out_dir)
    finally:
        for attr, module in held.items():
            setattr(model, attr, module)
    lines = [write(model, state, out_dir) for attr, _, write, _ in _beside() if attr in held]
    return cls_name, "\n".join(lines) or None


def load_served(model, folder: str | Path, device) -> None:
    """Add back every module an export keeps beside its base, with its weights (none: the plain model)."""
    for _, _, _, read in _beside():
        read(model, folder, device)
