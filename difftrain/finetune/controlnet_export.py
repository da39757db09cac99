"""A ControlNet's export (finetune/controlnet.py): ``DIR/controlnet/`` beside the base model's diffusers folder.

* The UNet's (finetune/controlnet_unet.py): the ``ControlNetModel``'s own ``save_pretrained`` folder, which
  ``ControlNetModel.from_pretrained`` loads for ``StableDiffusionControlNetPipeline`` and ``difftrain sample`` reads
  back.
* The DiT's: ``difftrain_controlnet.safetensors`` + ``difftrain_controlnet.json`` (``{"layers": N}``): the branch under our own
  keys (``control.*``), which ``difftrain sample EXPORT --control IMAGE`` reads back (``generator.load_export``).
  For a base exported as ``PixArtTransformer2DModel`` (text DiT, adaLN-single), ``config.json`` +
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

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from difftrain.models.diffusers_folder import load_safetensors

OURS = "difftrain_controlnet"
RESEARCH_CLASS = "PixArtControlNetAdapterModel"


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
    for f in folder.iterdir():  # an earlier export's files in this folder: now stale
        f.unlink()
    if hasattr(model.control, "net"):  # the UNet's: a diffusers ControlNetModel, its own folder
        net = model.control.net
        net.save_pretrained(str(folder), state_dict={k.removeprefix("control.net."): v for k, v in branch.items()},
                            safe_serialization=True)
        return (f"ControlNet in {folder}: a diffusers ControlNetModel folder (StableDiffusionControlNetPipeline; "
                f"control images in [0, 1] pixels, conditioning embedding {tuple(net.config.conditioning_embedding_out_channels)})")
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


def load_controlnet(model, folder: str | Path, device) -> bool:
    """Add the branch an export holds (``folder/controlnet``) to ``model``, with its weights; False when none."""
    from difftrain.finetune.controlnet import ControlNet, ControlNetArgs

    meta = Path(folder) / "controlnet" / f"{OURS}.json"
    config = meta.with_name("config.json")
    if not meta.is_file() and config.is_file() and json.loads(config.read_text()).get("_class_name") == "ControlNetModel":
        from diffusers import ControlNetModel

        from difftrain.finetune.controlnet_unet import UNetControlBranch

        model.control = UNetControlBranch(ControlNetModel.from_pretrained(str(config.parent)).to(device).eval())
        model.requires_grad_(False)
        return True
    if not meta.is_file():
        return False
    layers = int(json.loads(meta.read_text())["layers"])
    ControlNet(ControlNetArgs(layers=layers)).apply(model)
    state = load_safetensors(meta.with_suffix(".safetensors"), device=str(device))
    model.control.load_state_dict({k.removeprefix("control."): v for k, v in state.items()}, strict=True)
    model.requires_grad_(False)
    return True
