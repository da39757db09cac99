"""Run configuration: typed dataclasses loaded from YAML plus dotted ``key=value`` overrides.

What a model *is* (architecture kwargs) travels with its weights as ``config.json``; how a run
*executes* lives here. Every error is one line naming the offending key and what is valid, and is
raised before any process group starts: types and choices while building, value ranges and
cross-checks in :func:`validate`, and for a training launch (``world_size`` given) the layout
against the launcher's world size and the files the run reads.

Every field is tagged (``identity``, ``budget`` or ``execution``: docs/RELIABILITY.md) and may carry
its valid range (``ge``/``gt``/``le``/``lt``) in its metadata, next to its default. A resume compares
the checkpoint's config with the run's (:func:`config_changes`): a changed *identity* field is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml


class ConfigError(ValueError):
    """A config key, value or type is wrong; the message names the key."""


IDENTITY, BUDGET, EXECUTION = "identity", "budget", "execution"
TAGS = (IDENTITY, BUDGET, EXECUTION)


def _tagged(tag: str, default, choices=None, **bounds):
    meta: dict = {"tag": tag}
    if choices is not None:  # a callable: the names of a registry, read when a value is checked
        meta["choices"] = choices if callable(choices) else tuple(choices)
    if bounds:
        assert set(bounds) <= {"ge", "gt", "le", "lt"}, bounds
        meta["bounds"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def identity(default, choices=None, **bounds) -> Any:
    """A field that changes what is trained (model, objective, data): a resume refuses to change it."""
    return _tagged(IDENTITY, default, choices, **bounds)


def budget(default, choices=None, **bounds) -> Any:
    """How long and how hard it is trained (steps, learning rate and its schedule, EMA): a resume may change it."""
    return _tagged(BUDGET, default, choices, **bounds)


def execution(default, choices=None, **bounds) -> Any:
    """How the run executes (layout, workers, logging, checkpoints, evaluation): a resume may change it."""
    return _tagged(EXECUTION, default, choices, **bounds)


def _control_choices() -> tuple[str, ...]:
    from difftrain.data.control import control_choices

    return control_choices()


SAMPLERS = ("euler", "heun", "ddim", "dpmpp_2m", "consistency", "lcm", "consistency_edm")  # diffusion.samplers


@dataclass
class RunConfig:
    dir: str = execution("runs/default")
    seed: int = identity(0, ge=0)
    steps: int = budget(1000, ge=1)
    log_every: int = execution(10, ge=1)
    ckpt_every: int = execution(500, ge=0)  # 0 = only at the end and on SIGTERM
    keep_last: int = execution(3, ge=0)  # 0 = keep every checkpoint
    sample_every: int = execution(0, ge=0)  # 0 = never during training
    sample_num: int = execution(16, ge=1)
    sample_steps: int = execution(25, ge=1)
    sample_sampler: str = execution("dpmpp_2m", SAMPLERS)
    sample_guidance: float = execution(3.0)
    sample_prompts: list = execution([])  # text models; class models use labels 0..
    progress: bool = execution(True)
    device: str = execution("auto", ["auto", "cpu", "cuda"])
    # seconds without progress on any rank before the job is ended, naming the stalled rank and phase
    # (difftrain/train/supervise.py); must exceed the longest step and save; 0 = off
    timeout: float = execution(600.0, ge=0)
    trace_samples: bool = execution(False)  # write each step's sample keys to RUN/trace/rank_R.jsonl (data-order audits)
    allow_config_change: bool = execution(False)  # resume even when an identity field changed (docs/RELIABILITY.md)


@dataclass
class ModelConfig:
    name: str = identity("DiT-S/2")  # a key of difftrain.models.registry.MODELS
    image_size: int = identity(32, ge=1)  # in model space (latent size when a VAE is used)
    in_channels: int = identity(3, ge=1)
    cond: str = identity("none", ["none", "class", "text"])
    num_classes: int = identity(0, ge=0)
    # video: 0 = an image model; > 0 = a video model of the same name trained on clips of this many frames (in model
    # space). Position embeddings follow the input's shape, so other clip lengths work at inference.
    frames: int = identity(0, ge=0)
    temporal_patch: int = identity(1, ge=1)  # video: frames per patch (patch = temporal_patch x p x p)
    attention: str = identity("full", ["full", "factorized"])  # video: joint space-time, or space then time per block
    args: dict = identity({})  # architecture overrides, checked by the model's config


@dataclass
class DiffusionConfig:
    path: str = identity("vp_cosine", ["vp_cosine", "vp_linear", "rf"])
    density: str = identity("uniform", ["uniform", "logit_normal", "u_shaped", "cosine", "laplace", "edm"])
    density_args: dict = identity({})
    # loss weighting (difftrain/diffusion/weightings.py); docs/DIFFUSION.md
    weighting: str = identity("none", ["none", "min_snr", "sd3", "truncated_snr"])
    weighting_args: dict = identity({})
    target: str = identity("v", ["eps", "v", "x", "velocity", "x_eps"])  # x_eps: 2x output channels
    t_min: float = identity(1e-4, ge=0.0, lt=1.0)
    t_max: float = identity(1.0 - 1e-4, gt=0.0, le=1.0)
    # noise assignment (difftrain/diffusion/assign.py): none, linear (Immiscible diffusion, Hungarian), knn
    assign: str = identity("none", ["none", "linear", "knn"])
    assign_scope: str = identity("rank", ["rank", "global"])  # linear: per-rank batch or gathered over dp ranks
    assign_k: int = identity(4, ge=1)  # knn: candidate noises per sample


@dataclass
class DataConfig:
    # shard spec (difftrain/data/spec.py): a brace pattern, a list of patterns, or a list of
    # {shards, weight, name} mixed per sample by weight; pipe: URLs work
    train: Any = identity("")
    kind: str = identity("image", ["image", "video", "latent"])
    batch_size: int = identity(64, ge=1)  # global, over all data-parallel ranks and accumulation steps
    num_workers: int = execution(1, ge=0)
    channels: int = identity(3, ge=1)
    image_size: int = identity(32, ge=1)  # pixels (square); see buckets
    buckets: list = identity([])  # [[h, w], ...] aspect-ratio buckets; empty: image_size^2
    crop: str = identity("center", ["center", "random"])
    flip: bool = identity(False)  # random horizontal flip
    frames: int = identity(16, ge=1)  # video: frames per clip
    frame_stride: int = identity(1, ge=1)  # video: take every n-th frame (when fps = 0)
    fps: float = identity(0.0, ge=0.0)  # video: sample frames at this rate instead of a stride
    caption_dropout: float = identity(0.1, ge=0.0, lt=1.0)  # probability of the null condition (classifier-free guidance)
    require_caption: bool = identity(True)  # skip samples without a caption (missing_caption)
    min_image_size: int = identity(8, ge=0)  # skip images whose shorter side is smaller (too_small)
    filters: dict = identity({})  # json key -> "<op><number>", e.g. {punsafe: "<0.5"}
    # ControlNet's condition image (difftrain/data/control.py): "" none; member (each sample's KEY.control.png);
    # or a transform of the sample's image: edges | blur | grayscale | one registered with register_control
    control: str = identity("", _control_choices)
    shuffle_buffer: int = identity(0, ge=0)  # samples per stream; 0 = shard order only
    resampled: bool = identity(False)  # draw shards with replacement (no epochs) instead of per-epoch permutations
    streams: int = execution(0, ge=0)  # streams per batch group (difftrain/data/loader.py); 0 = data-parallel world size
    max_skip_rate: float = execution(0.5, gt=0.0, le=1.0)  # stop the run when more of the samples (or shards) seen are broken


@dataclass
class OptimConfig:
    lr: float = budget(1e-4, ge=0.0)  # 0: no update (stage trajectory's PTQ baseline: calibration only)
    betas: list = budget([0.9, 0.999])  # two numbers in [0, 1)
    weight_decay: float = budget(0.0, ge=0.0)
    eps: float = budget(1e-8, gt=0.0)
    warmup_steps: int = budget(0, ge=0)
    schedule: str = budget("cosine", ["cosine", "constant"])
    min_lr_ratio: float = budget(0.0, ge=0.0, le=1.0)
    grad_clip: float = budget(1.0, ge=0.0)  # 0 = off
    grad_accum: int = execution(1, ge=1)  # splits data.batch_size into micro-batches: the same update, less memory
    ema_decay: float = budget(0.999, ge=0.0, lt=1.0)
    # consecutive steps skipped for a non-finite loss or gradient before the run stops (train/engine.py)
    max_bad_steps: int = execution(10, ge=1)
    # the fused AdamW (and norms): torch's, NVIDIA apex's FusedAdam + FusedLayerNorm (train/apex.py: required), or
    # auto = apex where it imports on CUDA, else torch's
    impl: str = execution("auto", ["auto", "apex", "torch"])


@dataclass
class ParallelConfig:
    engine: str = execution("ddp")  # train/engine.py ENGINES: ddp | fsdp2 | deepspeed (checked in config_checks)
    # engine deepspeed (train/deepspeed_engine.py): ZeRO stage 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)
    zero_stage: int = execution(1, ge=1, le=3)
    zero_persistence_threshold: int = execution(100000, ge=0)  # ZeRO-3: smaller parameters stay whole on every rank
    # DeepSpeed's CPU offload (train/deepspeed_engine.py): the fp32 master weights, gradients and AdamW state in
    # host memory, stepped by DeepSpeedCPUAdam (ZeRO 1-3); and, ZeRO-3 only, the parameter partitions too
    zero_offload_optimizer: bool = execution(False)
    zero_offload_params: bool = execution(False)
    # -1 = whatever the other dimensions leave. Defaults: ddp replicates over all ranks; fsdp2 shards
    # over all ranks; set both for HSDP (e.g. dp_replicate=nodes, dp_shard=gpus per node).
    dp_replicate: int = execution(-1, ge=-1)  # -1 or >= 1
    dp_shard: int = execution(-1, ge=-1)  # -1 or >= 1
    tp: int = execution(1, ge=1)  # tensor parallelism of the DiT's blocks (parallelism/tensor_parallel.py; fsdp2)
    # dtensor: DTensor's parallel styles; megatron: megatron-core's column/row-parallel linear functions on the same
    # shards (its backward all-reduce overlapped with the weight gradient on GPU)
    tp_impl: str = execution("dtensor", ["dtensor", "megatron"])
    # sequence parallelism (with tp > 1, dtensor): between the blocks' matmuls (norms, modulation, residuals) each tp
    # rank holds 1/tp of the tokens; the all-reduces become all-gather + reduce-scatter (Korthikanti et al. 2022)
    sp: bool = execution(False)
    # pipeline ranks (docs/PIPELINE.md): the backbone is cut into pp segments (2 pp with interleaved_1f1b and
    # zero_bubble), one (two) per rank; every pp rank of a data-parallel slice reads the same batch
    pp: int = execution(1, ge=1)
    pp_schedule: str = execution("1f1b", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"])
    pp_microbatches: int = execution(4, ge=1)  # per step and data-parallel rank (with pp > 1 it replaces optim.grad_accum)
    # fill: the next step's frozen work (VAE, text encoder) in the bubbles (gpipe, 1f1b); balanced: computed up
    # front, an equal share per pp rank (any schedule); auto: fill where it applies, else balanced
    pp_frozen: str = execution("auto", ["auto", "fill", "balanced"])
    # replicate: every pp rank holds every frozen module; partition: each module on the ranks the simulator
    # picks (simulate.choose_owners), the others keep it in host memory outside sampling and validation
    pp_frozen_owners: str = execution("replicate", ["replicate", "partition"])
    pp_frozen_tolerance: float = execution(0.02, ge=0.0)  # partition: the simulated slowdown accepted to hold a module on one rank
    pp_bounds: list = execution([])  # first block of segments 1..n-1; empty: DP over FLOP costs
    mixed_precision: str = execution("auto", ["auto", "bf16", "fp32"])  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = execution(False)
    compile: bool = execution(False)
    compile_backend: str = execution("inductor")


@dataclass
class EncodersConfig:
    text: str = identity("")  # "" none; "minilm" (the packaged MiniLM); or a local HF folder (CLIP/T5/BERT)
    text_max_length: int = identity(32, ge=1)
    text_cache: int = execution(0, ge=0)  # LRU entries of per-caption states; > 0 pays off when captions repeat
    vae: str = identity("")  # "" = pixel space; else a local diffusers AutoencoderKL folder


@dataclass
class EvalConfig:
    """Validation during training (``difftrain.eval.validate``); ``difftrain eval`` takes flags instead."""
    every: int = execution(0, ge=0)  # steps between validations; 0 = off
    ref: str = execution("")  # held-out shard spec or image folder: reference images and the held-out loss
    num: int = execution(500, ge=2)  # generated samples (and reference images) per validation
    extractor: str = execution("inception")  # digits | inception[:FILE] | clip:PATH (see difftrain.eval.extractors)
    steps: int = execution(0, ge=0)  # 0: the stage's (run.sample_steps for pretrain; a student's own step count)
    sampler: str = execution("", ("", *SAMPLERS))  # "": the stage's (run.sample_sampler for pretrain)
    guidance: float = execution(-1.0)  # CFG scale; < 0: the stage's (run.sample_guidance for pretrain)
    loss_samples: int = execution(256, ge=0)  # held-out samples for the loss binned by t; 0 = off
    seed: int = execution(0, ge=0)


@dataclass
class Config:
    stage: str = identity("pretrain")  # the training objective: a key of train/stages STAGES (config_checks)
    stage_args: dict = identity({})  # the stage's own settings, checked by its dataclass (e.g. teacher: RUN@ema)
    # model changes applied in order to the stage's trained modules (difftrain/finetune): [{kind: lora, rank: 8}]
    adapt: list = identity([])
    # the trained module's initial weights (never a resume): RUN@ema | RUN@raw (a run's newest checkpoint), our
    # export or a diffusers folder (train/sources.py)
    init_from: str = identity("")
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
def parse_fields(prefix: str, cls, values: dict, owner: str):
    """``values`` (a config mapping: a stage's ``stage_args``, a model change's entry) as the dataclass ``cls``:
    types, choices, bounds and required keys checked, each error one line naming ``PREFIX.KEY`` and ``owner``."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}.{key}' for {owner}; valid keys: {', '.join(fields)}")
        kwargs[key] = _coerce(f"{prefix}.{key}", fields[key], value)
        bounds = fields[key].metadata.get("bounds")
        if bounds and not _in_range(kwargs[key], bounds):
            raise ConfigError(f"config key '{prefix}.{key}' must be {_range_text(bounds)}, got {value}")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ConfigError(f"config key '{prefix}.{missing[0]}' is required by {owner}")
    return cls(**kwargs)


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def leaf_fields(cls=Config, prefix: str = ""):
    """(dotted key, field) of every setting, sections walked in order (a dict field such as model.args is one)."""
    for name, f in _fields(cls).items():
        if dataclasses.is_dataclass(f.type):
            yield from leaf_fields(f.type, prefix + name + ".")
        else:
            yield prefix + name, f


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
    if callable(choices):
        choices = choices()
    if choices and value not in choices:
        shown = ", ".join(repr(c) if c == "" else str(c) for c in choices)
        raise ConfigError(f"config key '{key}' = {value!r} is not one of: {shown}")
    return value


def _range_text(b: dict) -> str:
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"


def _in_range(v, b: dict) -> bool:
    return (("ge" not in b or v >= b["ge"]) and ("gt" not in b or v > b["gt"])
            and ("le" not in b or v <= b["le"]) and ("lt" not in b or v < b["lt"]))


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


# A brace-expansion group of a shard pattern ({00000..00099}, {a,b}): no blank, no colon, so never a YAML flow
# mapping anyone means. YAML would read it as a mapping ({0..5} -> {'0..5': None}) or fail on what follows it
# ({0..5}.tar), so each group is swapped for a plain token while the value is parsed, and put back after.
_BRACE_GROUP = re.compile(r"\{[^{}\s:]*(?:\.\.|,)[^{}\s:]*\}")


def _hide_braces(raw: str) -> tuple[str, list[str]]:
    groups: list[str] = []

    def swap(m):
        groups.append(m.group(0))
        return f"DIFFTRAINBRACE{len(groups) - 1}X"

    while True:
        new = _BRACE_GROUP.sub(swap, raw)
        if new == raw:
            return raw, groups
        raw = new


def _restore_braces(value, groups: list[str]):
    if isinstance(value, str):
        for i in reversed(range(len(groups))):
            value = value.replace(f"DIFFTRAINBRACE{i}X", groups[i])
        return value
    if isinstance(value, list):
        return [_restore_braces(v, groups) for v in value]
    if isinstance(value, dict):
        return {_restore_braces(k, groups): _restore_braces(v, groups) for k, v in value.items()}
    return value


def _keyless(value) -> str | None:
    """A mapping key without a value anywhere in ``value`` ({depth:2} is {'depth:2': None} to YAML)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None:
                return str(k)
            found = _keyless(v)
            if found is not None:
                return found
    if isinstance(value, list):
        for v in value:
            found = _keyless(v)
            if found is not None:
                return found
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=VALUE`` -> (key, value), VALUE read as YAML. Brace patterns stay strings (also inside a list:
    ``data.train=[/a/{0..5}.tar, /b.tar]``); a value that is not valid YAML is an error, never a raw string."""
    if "=" not in text:
        raise ConfigError(f"config override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if raw == "":
        return key, ""
    hidden, groups = _hide_braces(raw)
    try:
        value = _restore_braces(yaml.safe_load(hidden), groups)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(f"config override '{text}' is not valid YAML ({why}); quote a string that holds YAML "
                          f"punctuation, also inside a list: {key}='\"...\"', {key}='[\"...\", \"...\"]'") from None
    missing = _keyless(value)
    if missing is not None:
        raise ConfigError(f"config override '{text}': mapping key '{missing}' has no value "
                          "(write 'key: value', with a blank after the colon)")
    return key, "" if value is None else value


def read_tree(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The nested dict of ``path`` (YAML) with the dotted ``overrides`` applied; nothing checked yet (that is
    ``config_checks.load_config``)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            why = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
            raise ConfigError(f"config file '{p}' is not valid YAML{where}: {why}") from None
    for o in overrides:
        key, value = parse_override(o)
        _set_dotted(tree, key, value)
    return tree


def from_saved(tree: dict) -> Config:
    """A config from the nested dict a run saved (``to_dict``; it was checked when the run started): typed, not
    checked again (loading a config to run goes through ``config_checks.load_config``)."""
    return _build(Config, tree)


# ------------------------------------------------------------------------------ saving, resuming
def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _config_text(cfg: Config, note: str = "") -> tuple[str, str]:
    h = config_hash(cfg)
    return h, f"# config hash {h}\n" + note + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, run_dir: str | Path) -> str:
    """Write the resolved config and its hash as ``RUN/config.yaml``; returns the hash. The trainer writes it
    while the run has no checkpoint; a resume writes :func:`save_resume_config` beside it instead."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    h, text = _config_text(cfg)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "config.yaml")
    return h


def save_resume_config(cfg: Config, run_dir: str | Path, step: int) -> Path:
    """Write the config of a resume from ``step`` as ``RUN/config.resume-STEP.yaml`` (``-STEP.2.yaml``, ... when
    the step was resumed from before): never overwrites a file. Returns its path."""
    run_dir = Path(run_dir)
    _, text = _config_text(cfg, f"# resumed from the checkpoint of step {step}; config.yaml holds the first run's\n")
    tmp = run_dir / f"config.resume-{step}.yaml.tmp"
    tmp.write_text(text)
    try:
        for n in range(1, 10_000):
            target = run_dir / (f"config.resume-{step}.yaml" if n == 1 else f"config.resume-{step}.{n}.yaml")
            try:
                os.link(tmp, target)  # atomic, and fails where the name exists
                return target
            except FileExistsError:
                continue
        raise ConfigError(f"'{run_dir}' holds 9999 configs of resumes from step {step}")
    finally:
        tmp.unlink(missing_ok=True)


class Change(NamedTuple):
    key: str
    tag: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


_ABSENT = object()


def _lookup(tree, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_changes(saved: dict, cfg: Config) -> list[Change]:
    """Every setting of ``cfg`` that differs from ``saved`` (a checkpoint's ``to_dict`` as JSON), with its tag.
    A key the saved config lacks (a field added since) is compared with the field's default; keys it has that no
    longer exist are ignored."""
    now = json.loads(json.dumps(to_dict(cfg)))
    out = []
    for key, f in leaf_fields():
        old = _lookup(saved, key)
        if old is _ABSENT:
            old = json.loads(json.dumps(_default(f)))
        new = _lookup(now, key)
        if old != new:
            out.append(Change(key, f.metadata["tag"], old, new))
    return out
