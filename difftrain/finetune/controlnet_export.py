"""A DiT ControlNet's export (finetune/controlnet.py): ``DIR/controlnet/`` beside the base model's diffusers folder.

* ``difftrain_controlnet.safetensors`` + ``difftrain_controlnet.json`` (``{"layers": N}``): the branch under our own
  keys (``control.*``), which ``difftrain sample EXPORT --control IMAGE`` reads back (``generator.load_export``).
* For a base exported as ``PixArtTransformer2DModel`` (text DiT, adaLN-single), ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` in the layout of diffusers' PixArt ControlNet research project
  (``examples/research_projects/pixart/controlnet_pixart_alpha.py``, ``PixArtControlNetAdapterModel(num_layers=N)``):
  ``controlnet_blocks.{j}.transformer_block.*`` (a diffusers ``BasicTransformerBlock``, the base block's keys),
  ``controlnet_blocks.0.before_proj.*`` and ``controlnet_blocks.{j}.after_proj.*``. That project is custom code, not
  a diffusers class: the test loads each block into diffusers' own ``BasicTransformerBlock`` and runs the project's
  wiring over the exported ``PixArtTransformer2DModel``, which reproduces our output. A class-conditional DiT
  (``DiTTransformer2DModel``, adaLN-Zero) has no such layout: only our own files are written, and the reason is
  printed.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from difftrain.models.diffusers_folder import load_safetensors

OURS = "difftrain_controlnet"
RESEARCH_CLASS = "PixArtControlNetAdapterModel"


@contextlib.contextmanager
def without_branch(model):
    """``model`` as its plain architecture (the branch detached) inside, for the base's export."""
    branch = model.control
    del model.control
    try:
        yield model
    finally:
        model.control = branch


def research_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The branch's tensors of ``state`` (our keys) under the research project's keys."""
    from difftrain.models.dit_export import key_map

    out = {"controlnet_blocks.0.before_proj.weight": state["control.before_proj.weight"],
           "controlnet_blocks.0.before_proj.bias": state["control.before_proj.bias"]}
    n = len(model.control.blocks)
    for j in range(n):
        out[f"controlnet_blocks.{j}.after_proj.weight"] = state[f"control.after_proj.{j}.weight"]
        out[f"controlnet_blocks.{j}.after_proj.bias"] = state[f"control.after_proj.{j}.bias"]
        ours, theirs = f"blocks.{j}.", f"transformer_blocks.{j}."
        for dsts, src in key_map(model.config):
            if src.startswith(ours):
                parts = state["control." + src].chunk(len(dsts))
                for d, t in zip(dsts, parts):
                    out[f"controlnet_blocks.{j}.transformer_block." + d.removeprefix(theirs)] = t
    return out


def export_controlnet(model, state: dict[str, torch.Tensor], out_dir: str | Path) -> str:
    """Write the branch of ``state`` under ``out_dir/controlnet``; returns a line saying what was written."""
    from difftrain.models.dit_export import diffusers_target

    folder = Path(out_dir) / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    branch = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("control.")}
    n = len(model.control.blocks)
    save_file(branch, str(folder / f"{OURS}.safetensors"))
    (folder / f"{OURS}.json").write_text(json.dumps({"layers": n}))
    if diffusers_target(model.config)[0] != "PixArtTransformer2DModel":
        return (f"ControlNet ({n} blocks) in {folder}/{OURS}.safetensors; no {RESEARCH_CLASS} folder: that layout "
                "pairs with PixArt's adaLN-single blocks, not a class-conditional adaLN-Zero DiT")
    research = {k: v.detach().cpu().clone().contiguous() for k, v in research_state(model, state).items()}
    save_file(research, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": RESEARCH_CLASS, "num_layers": n}, indent=1))
    return f"ControlNet ({n} blocks) in {folder}: {RESEARCH_CLASS} layout and {OURS}.safetensors"


def save_served(model, state: dict[str, torch.Tensor], out_dir: str | Path) -> tuple[str, str | None]:
    """``model.save_diffusers`` of the served model's ``state``; a ControlNet's base as usual and its branch beside it
    (:func:`export_controlnet`). Returns (the diffusers class, the branch's line or None)."""
    if getattr(model, "control", None) is None:
        return model.save_diffusers(state, out_dir), None
    with without_branch(model):
        cls_name = model.save_diffusers({k: v for k, v in state.items() if not k.startswith("control.")}, out_dir)
    return cls_name, export_controlnet(model, state, out_dir)


def load_controlnet(model, folder: str | Path, device) -> bool:
    """Add the branch an export holds (``folder/controlnet``) to ``model``, with its weights; False when none."""
    from difftrain.finetune.controlnet import ControlNet, ControlNetArgs

    meta = Path(folder) / "controlnet" / f"{OURS}.json"
    if not meta.is_file():
        return False
    layers = int(json.loads(meta.read_text())["layers"])
    ControlNet(ControlNetArgs(layers=layers)).apply(model)
    state = load_safetensors(meta.with_suffix(".safetensors"), device=str(device))
    model.control.load_state_dict({k.removeprefix("control."): v for k, v in state.items()}, strict=True)
    model.requires_grad_(False)
    return True
