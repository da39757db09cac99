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
    p = Path(folder)
    config = read_json(p / "config.json", what="a diffusers model folder")
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(p):
        state.update(load_safetensors(f))
    return config, state


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a diffusers model folder (one file, or the shards its index names), without opening
    them; ``ValueError`` naming what is missing or refused."""
    p = Path(folder)
    if (p / WEIGHTS_NAME).is_file():
        return [p / WEIGHTS_NAME]
    if (p / INDEX_NAME).is_file():
        index = read_json(p / INDEX_NAME, what="a shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"'{p / INDEX_NAME}' has no weight_map of key -> shard file name")
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(f"'{p / INDEX_NAME}' names shard {name!r}: expected a .safetensors file in the folder")
            if not (p / name).is_file():
                raise ValueError(f"'{p / INDEX_NAME}' names shard {name!r}, which is not in the folder")
            files.append(p / name)
        return files
    pickles = sorted(p.glob("*.bin"))
    if pickles:
        raise ValueError(f"'{pickles[0]}' is a pickle checkpoint, which is never loaded (it can run code); "
                         f"convert it to {WEIGHTS_NAME}")
    raise ValueError(f"'{p}' has no {WEIGHTS_NAME} (nor {INDEX_NAME})")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when it is missing, unreadable or not an object."""
    if not path.is_file():
        raise ValueError(f"'{path.parent}' is not {what}: no {path.name}")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"'{path}' is not readable JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"'{path}' is not a JSON object")
    return value


def check_safetensors(path: Path) -> None:
    """Parse the header of a safetensors file (no tensor is read): its JSON, the dtypes and shapes against the data
    offsets, and that the data covers the file exactly (a truncated file fails here). ``ValueError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # SafetensorError, OSError
        raise ValueError(f"'{path}' is not a readable safetensors file ({_first_line(e)})") from None


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a one-line ``ValueError`` naming the file when it is unreadable."""
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except Exception as e:
        raise ValueError(f"'{path}' is not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


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
