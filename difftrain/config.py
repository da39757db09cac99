"""Run configuration: typed dataclasses loaded from YAML plus dotted ``key=value`` overrides.

What a model *is* (architecture kwargs) travels with its weights as ``config.json``; how a run
*executes* lives here. Every error is one line naming the offending key and what is valid, and is
raised before any process group starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, value or type is wrong; the message names the key."""


def choice(default, choices):
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500  # 0 = only at the end and on SIGTERM
    keep_last: int = 3
    sample_every: int = 0  # 0 = never during training
    sample_num: int = 16
    sample_steps: int = 25
    sample_sampler: str = choice("dpmpp_2m", ["euler", "heun", "ddim", "dpmpp_2m"])
    sample_guidance: float = 3.0
    sample_prompts: list = field(default_factory=list)  # text models; class models use labels 0..
    progress: bool = True
    device: str = choice("auto", ["auto", "cpu", "cuda"])
    # seconds without progress on any rank before the job is ended, naming the stalled rank and phase
    # (difftrain/train/supervise.py); must exceed the longest step and save; 0 = off
    timeout: float = 600.0
    trace_samples: bool = False  # write each step's sample keys to RUN/trace/rank_R.jsonl (data-order audits)


@dataclass
class ModelConfig:
    name: str = "DiT-S/2"  # a key of difftrain.models.registry.MODELS
    image_size: int = 32  # in model space (latent size when a VAE is used)
    in_channels: int = 3
    cond: str = choice("none", ["none", "class", "text"])
    num_classes: int = 0
    # video: 0 = an image model; > 0 = a video model of the same name trained on clips of this many frames (in model
    # space). Position embeddings follow the input's shape, so other clip lengths work at inference.
    frames: int = 0
    temporal_patch: int = 1  # video: frames per patch (patch = temporal_patch x p x p)
    attention: str = choice("full", ["full", "factorized"])  # video: joint space-time, or space then time per block
    args: dict = field(default_factory=dict)  # architecture overrides, checked by the model's config


@dataclass
class DiffusionConfig:
    path: str = choice("vp_cosine", ["vp_cosine", "vp_linear", "rf"])
    density: str = choice("uniform", ["uniform", "logit_normal", "u_shaped", "cosine", "laplace", "edm"])
    density_args: dict = field(default_factory=dict)
    # loss weighting (difftrain/diffusion/weightings.py); docs/DIFFUSION.md
    weighting: str = choice("none", ["none", "min_snr", "sd3", "truncated_snr"])
    weighting_args: dict = field(default_factory=dict)
    target: str = choice("v", ["eps", "v", "x", "velocity"])
    t_min: float = 1e-4
    t_max: float = 1.0 - 1e-4
    # noise assignment (difftrain/diffusion/assign.py): none, linear (Immiscible diffusion, Hungarian), knn
    assign: str = choice("none", ["none", "linear", "knn"])
    assign_scope: str = choice("rank", ["rank", "global"])  # linear: per-rank batch or gathered over dp ranks
    assign_k: int = 4  # knn: candidate noises per sample


@dataclass
class DataConfig:
    # shard spec (difftrain/data/spec.py): a brace pattern, a list of patterns, or a list of
    # {shards, weight, name} mixed per sample by weight; pipe: URLs work
    train: Any = ""
    kind: str = choice("image", ["image", "video", "latent"])
    batch_size: int = 64  # global, over all data-parallel ranks and accumulation steps
    num_workers: int = 1
    channels: int = 3
    image_size: int = 32  # pixels (square); see buckets
    buckets: list = field(default_factory=list)  # [[h, w], ...] aspect-ratio buckets; empty: image_size^2
    crop: str = choice("center", ["center", "random"])
    flip: bool = False  # random horizontal flip
    frames: int = 16  # video: frames per clip
    frame_stride: int = 1  # video: take every n-th frame (when fps = 0)
    fps: float = 0.0  # video: sample frames at this rate instead of a stride
    caption_dropout: float = 0.1  # probability of the null condition (classifier-free guidance)
    require_caption: bool = True  # skip samples without a caption (missing_caption)
    min_image_size: int = 8  # skip images whose shorter side is smaller (too_small)
    filters: dict = field(default_factory=dict)  # json key -> "<op><number>", e.g. {punsafe: "<0.5"}
    shuffle_buffer: int = 0  # samples per stream; 0 = shard order only
    resampled: bool = False  # draw shards with replacement (no epochs) instead of per-epoch permutations
    streams: int = 0  # streams per batch group (difftrain/data/loader.py); 0 = data-parallel world size
    max_skip_rate: float = 0.5  # stop the run when more of the samples seen are broken


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = choice("cosine", ["cosine", "constant"])
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1
    ema_decay: float = 0.999


@dataclass
class ParallelConfig:
    engine: str = choice("ddp", ["ddp", "fsdp2"])
    # -1 = whatever the other dimensions leave. Defaults: ddp replicates over all ranks; fsdp2 shards
    # over all ranks; set both for HSDP (e.g. dp_replicate=nodes, dp_shard=gpus per node).
    dp_replicate: int = -1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1  # pipeline stages (docs/PIPELINE.md); every pp rank of a data-parallel slice reads the same batch
    pp_schedule: str = choice("1f1b", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"])
    pp_microbatches: int = 4  # per step and data-parallel rank (with pp > 1 it replaces optim.grad_accum)
    # fill: the next step's frozen work (VAE, text encoder) in the bubbles (gpipe, 1f1b); balanced: computed up
    # front, an equal share per pp rank (any schedule); auto: fill where it applies, else balanced
    pp_frozen: str = choice("auto", ["auto", "fill", "balanced"])
    # replicate: every pp rank holds every frozen module; partition: each module on the ranks the simulator
    # picks (simulate.choose_owners), the others keep it in host memory outside sampling and validation
    pp_frozen_owners: str = choice("replicate", ["replicate", "partition"])
    pp_frozen_tolerance: float = 0.02  # partition: the simulated slowdown accepted to hold a module on one rank
    pp_bounds: list = field(default_factory=list)  # first block of stages 1..n-1; empty: DP over FLOP costs
    mixed_precision: str = choice("auto", ["auto", "bf16", "fp32"])  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"


@dataclass
class EncodersConfig:
    text: str = ""  # "" none; "minilm" (the packaged MiniLM); or a local HF folder (CLIP/T5/BERT)
    text_max_length: int = 32
    text_cache: int = 0  # LRU entries of per-caption states; > 0 pays off when captions repeat
    vae: str = ""  # "" = pixel space; else a local diffusers AutoencoderKL folder


@dataclass
class EvalConfig:
    """Validation during training (``difftrain.eval.validate``); ``difftrain eval`` takes flags instead."""
    every: int = 0  # steps between validations; 0 = off
    ref: str = ""  # held-out shard spec or image folder: reference images and the held-out loss
    num: int = 500  # generated samples (and reference images) per validation
    extractor: str = "inception"  # digits | inception[:FILE] | clip:PATH (see difftrain.eval.extractors)
    steps: int = 25
    sampler: str = choice("dpmpp_2m", ["euler", "heun", "ddim", "dpmpp_2m"])
    guidance: float = -1.0  # CFG scale; < 0: run.sample_guidance
    loss_samples: int = 256  # held-out samples for the loss binned by t; 0 = off
    seed: int = 0


@dataclass
class Config:
    stage: str = choice("pretrain", ["pretrain"])
    init_from: str = ""  # weights only (our export or a diffusers folder); never a resume
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    typ = f.type
    if isinstance(typ, types.GenericAlias):
        typ = typing.get_origin(typ)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        typ is Any
        or (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
        or (typ is list and isinstance(value, list))
        or (typ is dict and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(f"config key '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    if typ is float:
        value = float(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{full}'; valid keys in '{prefix.rstrip('.') or '<root>'}': "
                f"{', '.join(fields)}"
            )
        f = fields[key]
        if dataclasses.is_dataclass(f.type):
            kwargs[key] = _build(f.type, value, full + ".")
        else:
            kwargs[key] = _coerce(full, f, value)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"config override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
    for o in overrides:
        key, value = parse_override(o)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.data.batch_size <= 0:
        raise ConfigError("config key 'data.batch_size' must be > 0")
    if cfg.optim.grad_accum <= 0:
        raise ConfigError("config key 'optim.grad_accum' must be > 0")
    if cfg.model.cond == "class" and cfg.model.num_classes <= 0:
        raise ConfigError("config key 'model.num_classes' must be > 0 when model.cond=class")
    if cfg.model.cond == "text" and not cfg.encoders.text:
        raise ConfigError("config key 'encoders.text' must name a text encoder when model.cond=text")
    if (cfg.data.kind == "video" and cfg.model.frames <= 0) or (cfg.data.kind == "image" and cfg.model.frames > 0):
        raise ConfigError(f"config key 'model.frames' = {cfg.model.frames} does not fit data.kind = "
                          f"{cfg.data.kind!r}: video data needs a video model (model.frames > 0) and vice versa")
    if cfg.eval.every < 0 or cfg.eval.num < 2 or cfg.eval.loss_samples < 0:
        raise ConfigError("config keys 'eval.every' and 'eval.loss_samples' must be >= 0 and 'eval.num' >= 2")
    if cfg.eval.every and not cfg.eval.ref:
        raise ConfigError("config key 'eval.ref' must name held-out shards (or an image folder) when eval.every > 0")
    if not 0.0 <= cfg.data.caption_dropout < 1.0:
        raise ConfigError("config key 'data.caption_dropout' must be in [0, 1)")
    pc = cfg.parallel
    if pc.pp > 1:
        if cfg.optim.grad_accum != 1:
            raise ConfigError("config key 'optim.grad_accum' must be 1 with parallel.pp > 1: the pipeline's "
                              "micro-batches (parallel.pp_microbatches) are the accumulation")
        if pc.pp_microbatches < 1:
            raise ConfigError("config key 'parallel.pp_microbatches' must be >= 1")
        if pc.pp_frozen == "fill" and pc.pp_schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"config key 'parallel.pp_frozen' = fill works with pp_schedule gpipe or 1f1b, not "
                              f"{pc.pp_schedule!r}; use balanced (or auto)")
        if pc.tp != 1:
            raise ConfigError("config key 'parallel.tp' must be 1 (tensor parallelism is not built yet)")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Config, run_dir: str | Path) -> str:
    """Write the resolved config and its hash into the run dir; returns the hash."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    h = config_hash(cfg)
    text = f"# config hash {h}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")
    return h
