"""Export a LoRA run's adapters so stock loaders apply them (issue 17, must-have 5a; ../shared/PEERS.md D1).

``difftrain export RUN --out DIR`` writes, besides the merged model, each named adapter (``adapt[i].name``) under
``DIR/lora/NAME/`` (always a sub-folder named for the adapter, ``default`` included, so several adapters trained
in turn sit side by side), in the form the exported diffusers class is served with:

* ``UNet2DConditionModel`` (the text UNet): diffusers' LoRA file ``pytorch_lora_weights.safetensors``, keys
  ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (DoRA: ``lora_magnitude_vector``), written by diffusers'
  own ``StableDiffusionLoraLoaderMixin.save_lora_weights`` with the safetensors header ``lora_adapter_metadata``
  (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, ``unet.use_dora``): the loader builds its
  ``LoraConfig`` from it, so alpha survives (without it diffusers sets alpha = r, diffusers#6087). Served by
  ``pipe.load_lora_weights(DIR/lora/NAME, adapter_name=NAME)`` or ``unet.load_lora_adapter(..., prefix="unet")``.
* ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` and ``UNet2DModel`` (no diffusers LoRA loader): a peft
  adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), written by peft's own
  ``PeftModel.save_pretrained`` and served by ``PeftModel.from_pretrained(<base diffusers model>, DIR/lora/NAME)``.

Module names are the diffusers class's. Our fused projections become diffusers' separate ones exactly: the LoRA
of ``attn.qkv`` (``W + s B A``, rows q, k, v) is, for ``to_q`` / ``to_k`` / ``to_v``, the same ``A`` and the
matching third of ``B``'s rows, since row block i of ``B A`` is ``B_i A``; ``cross_attn.kv`` likewise into
``to_k`` / ``to_v``. DoRA's magnitude (one per output row, Liu et al. 2024 Eq. 5, the norm taken per row) splits
by rows too. A module diffusers keeps several copies of (the DiT's timestep embedder in every block) gets the
same adapter on each copy. A LoRA'd module with no diffusers Linear counterpart is refused, naming it.

The base an adapter applies to is the run's frozen base (its ``init_from``, or a stage's teacher), not the merged
export: ``DIR/difftrain.json`` records it under ``lora.base`` (source and fingerprint, as the checkpoint does);
``difftrain export`` of that run (``RUN@ema``) or that diffusers folder is the model to load the adapter onto.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from difftrain.finetune.lora import LoRA
from difftrain.models.dit_export import ExportError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "base_model.model."  # peft's key prefix of a wrapped model


def _dit_target(model) -> tuple[str, dict, dict]:
    """DiT -> (diffusers class, kwargs, our Linear -> [diffusers Linears, one per row block] per copy)."""
    from difftrain.models.dit_export import diffusers_target, key_map

    cfg = model.config
    name, kwargs = diffusers_target(cfg)
    modules: dict[str, list[tuple[str, ...]]] = {}
    for dsts, src in key_map(cfg):
        if src.endswith(".weight") and all(d.endswith(".weight") for d in dsts):
            modules.setdefault(src.removesuffix(".weight"), []).append(tuple(d.removesuffix(".weight") for d in dsts))
    return name, kwargs, modules


def _unet_target(model) -> tuple[str, dict, dict]:
    """UNet -> (diffusers class, kwargs, our Linear -> its diffusers name: ours without ``inner.``)."""
    from difftrain.models.unet import diffusers_kwargs

    name, kwargs = diffusers_kwargs(model.config)
    modules = {n: [(n.removeprefix("inner."),)] for n, _ in model.named_modules() if n.startswith("inner.")}
    return name, kwargs, modules


def _target(model: nn.Module) -> tuple[str, dict, dict]:
    from difftrain.models.dit import DiT
    from difftrain.models.unet import UNet

    families = {DiT: _dit_target, UNet: _unet_target}  # exact classes: a video DiT exports to no diffusers class
    if type(model) not in families:
        raise ExportError(f"cannot export the LoRA adapters of a {type(model).__name__}: only the image DiT and the "
                          "UNet export to a diffusers class")
    return families[type(model)](model)


def adapter_tensors(model: nn.Module, lora: LoRA, modules: dict, linear) -> dict[str, torch.Tensor]:
    """``lora``'s weights in ``model`` (its changes applied, unmerged) as peft's state-dict keys of the diffusers
    model (``base_model.model.<module>.lora_A.default.weight``, ...), fused projections split by rows.
    ``linear(name)``: whether the diffusers model's module ``name`` is a Linear."""
    from peft.tuners.lora import LoraLayer

    name = lora.args.name
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}
    unmapped = sorted(n for n in layers if n not in modules or not all(linear(d) for ds in modules[n] for d in ds))
    if unmapped:
        raise ExportError(f"cannot export LoRA adapter '{name}' ({lora.key}): {', '.join(unmapped)} "
                          "has no diffusers Linear counterpart; leave it out of the targets")
    out: dict[str, torch.Tensor] = {}
    for n, m in layers.items():
        a, b = m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach()  # [r, in], [out, r]
        mag = m.lora_magnitude_vector[name].weight.detach() if name in m.lora_magnitude_vector else None  # [out]
        for parts in modules[n]:  # one entry per copy diffusers keeps
            for i, d in enumerate(parts):  # row block i of B A is B_i A
                key = f"{PREFIX}{d}"
                out[f"{key}.lora_A.default.weight"] = a.clone()
                out[f"{key}.lora_B.default.weight"] = b.chunk(len(parts))[i].clone()
                if mag is not None:
                    out[f"{key}.lora_magnitude_vector.default.weight"] = mag.chunk(len(parts))[i].clone()
    return out


def export_adapters(model: nn.Module, changes: list, out_dir: str | Path) -> dict[str, dict]:
    """Write each LoRA of ``changes`` (applied to ``model``, unmerged) under ``out_dir/lora/NAME``; returns, per
    adapter name, what was written (for ``difftrain.json``)."""
    import diffusers
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    loras = [c for c in changes if isinstance(c, LoRA)]
    if not loras:
        return {}
    cls_name, kwargs, modules = _target(model)
    out: dict[str, dict] = {}
    for lora in loras:
        a = lora.args
        with torch.device("meta"):  # the diffusers class's module tree only: no base weights are made
            dmodel = getattr(diffusers, cls_name)(**kwargs)
        tensors = adapter_tensors(model, lora, modules,
                                  lambda d: isinstance(dmodel.get_submodule(d), nn.Linear))
        targets = sorted({k[len(PREFIX):].split(".lora_")[0] for k in tensors})
        config = LoraConfig(r=a.rank, lora_alpha=a.alpha or a.rank, lora_dropout=a.dropout, use_dora=a.dora,
                            target_modules=targets)
        peft_model = get_peft_model(dmodel, config)  # adapter "default": the name is the loader's to choose
        expected = {k for k in peft_model.state_dict() if ".lora_" in k}
        if expected != tensors.keys():  # every adapter tensor peft made is one of ours, and the reverse
            raise ExportError(f"LoRA adapter '{a.name}': peft's {cls_name} adapter has keys "
                              f"{sorted(expected ^ tensors.keys())[:3]} that the export does not match")
        peft_model.load_state_dict(tensors, strict=False, assign=True)
        where = Path(out_dir) / "lora" / a.name
        if cls_name == "UNet2DConditionModel":  # diffusers' own LoRA format and writer (PEERS D1)
            from diffusers.loaders import StableDiffusionLoraLoaderMixin

            state = {k.removeprefix(PREFIX): v for k, v in get_peft_model_state_dict(peft_model).items()}
            metadata = {"r": a.rank, "lora_alpha": config.lora_alpha, "target_modules": targets, "use_dora": a.dora,
                        "lora_dropout": a.dropout}
            StableDiffusionLoraLoaderMixin.save_lora_weights(str(where), unet_lora_layers=state,
                                                             unet_lora_adapter_metadata=metadata)
            loader, files = "diffusers", [DIFFUSERS_FILE]
        else:  # no diffusers LoRA loader for this class: peft's adapter folder
            peft_model.save_pretrained(str(where))
            loader, files = "peft", ["adapter_config.json", "adapter_model.safetensors"]
        out[a.name] = {"path": f"lora/{a.name}", "loader": loader, "files": files, "diffusers_class": cls_name,
                       "rank": a.rank, "alpha": float(config.lora_alpha), "dora": a.dora, "modules": len(targets),
                       "bytes": sum((where / f).stat().st_size for f in files)}
    return out


def base_of(state: dict, cfg) -> dict | None:
    """The frozen base a run's adapters apply to: the checkpoint's record of it (``train_state["base"]``: source and
    fingerprint), else (a checkpoint written before it kept one) the run's ``init_from`` fingerprinted now; None for a base the run drew from its seed (kept in
    its checkpoints, not exported by itself)."""
    from difftrain.train.sources import Source

    record = (state.get("base") or {}).get(state.get("served"))  # a served derived copy has its original's record
    if record is not None:
        return {k: record[k] for k in ("source", "step", "sha256") if k in record}
    if cfg.init_from:
        return Source.parse("init_from", cfg.init_from).fingerprint()
    return None


def export_run_adapters(model: nn.Module, changes: list, run: str | Path, step: int, cfg,
                        out_dir: str | Path) -> dict | None:
    """``difftrain export``'s part for a run trained with LoRA (``adapt``): the adapters of ``model`` (the run's
    served module as read for serving, EMA weights, its ``changes`` applied and not merged) under ``out_dir/lora/``;
    returns ``{"base": ..., "adapters": ...}`` for ``difftrain.json`` (with ``not_written``, the reason, and no
    adapters when the run has other model changes too), or None when the run has no LoRA."""
    from difftrain.train.checkpoint import read_train_state, step_dir

    if not any(isinstance(c, LoRA) for c in changes):
        return None
    others = sorted({c.kind for c in changes if not isinstance(c, LoRA)})
    if others:  # the adapters alone would serve the base without these: only the merged model is the run's
        return {"base": None, "adapters": {}, "not_written": f"the run also has model changes ({', '.join(others)}) "
                "that a LoRA file does not carry: serve the merged model"}
    state = read_train_state(step_dir(Path(run) / "checkpoints", step))
    return {"base": base_of(state, cfg), "adapters": export_adapters(model, changes, out_dir)}
