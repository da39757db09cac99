"""Read a diffusers model folder (``config.json`` + safetensors) without unpickling anything.

Shared by every architecture's ``load_diffusers``: the architecture maps the diffusers state dict to its own keys
and says which diffusers class and constructor kwargs it corresponds to; this module reads the files and checks the
folder's config against those kwargs, with diffusers' own defaults standing in for keys the folder leaves out.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"  # sharded: {"weight_map": {key: shard file name}}
# constructor kwargs that leave every weight's shape and role unchanged: init_from takes weights only, and may go on
# at another resolution (sample_size, interpolation_scale only set the fixed position grid)
NOT_COMPARED = frozenset({"dropout", "norm_eps", "upcast_attention", "sample_size", "interpolation_scale"})


def read_diffusers_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, the diffusers state dict) from a model folder: one safetensors file or an index of
    shards. A folder holding only pickle ``.bin`` weights is refused (loading those can run arbitrary code)."""
    from safetensors.torch import load_file

    p = Path(folder)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"'{p}' is not a diffusers model folder: no config.json")
    config = json.loads(cfg_file.read_text())
    if (p / WEIGHTS_NAME).is_file():
        return config, load_file(str(p / WEIGHTS_NAME))
    if (p / INDEX_NAME).is_file():
        shards = sorted(set(json.loads((p / INDEX_NAME).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in shards:
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(f"'{p / INDEX_NAME}' names shard {name!r}: expected a .safetensors file in the folder")
            state.update(load_file(str(p / name)))
        return config, state
    pickles = sorted(p.glob("*.bin"))
    if pickles:
        raise ValueError(f"'{pickles[0]}' is a pickle checkpoint, which is never loaded (it can run code); "
                         f"convert it to {WEIGHTS_NAME}")
    raise ValueError(f"'{p}' has no {WEIGHTS_NAME} (nor {INDEX_NAME})")


def _defaults(cls_name: str) -> dict:
    import diffusers

    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    return {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}


def _plain(v):
    return json.loads(json.dumps(v))  # tuples -> lists, as config.json stores them


def check_diffusers_config(folder: str | Path, found: dict, cls_name: str, kwargs: dict,
                           aliases: tuple[str, ...] = ()) -> None:
    """``ValueError`` naming the first key where the folder's ``config.json`` (``found``) differs from the model
    ``diffusers.<cls_name>(**kwargs)``; a key missing from either side takes the constructor's default."""
    where = Path(folder) / "config.json"
    have_name = found.get("_class_name")
    if have_name != cls_name and have_name not in aliases:
        raise ValueError(f"'{where}': _class_name = {have_name!r}, but the model is a {cls_name}")
    defaults = _defaults(cls_name)
    for key in sorted(defaults.keys() | kwargs.keys()):
        if key in NOT_COMPARED:
            continue
        want, have = _plain(kwargs.get(key, defaults.get(key))), _plain(found.get(key, defaults.get(key)))
        if have != want:
            raise ValueError(f"'{where}': {key} = {have!r}, but the model has {key} = {want!r}")
