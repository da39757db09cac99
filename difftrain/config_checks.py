"""Loading a config to run (:func:`load_config`, :func:`from_dict`: build the dataclasses, then check them) and the
checks, all before any process group: every field's range (from its tag's bounds), the cross-field rules,
and for a training launch (``world_size`` known from the launcher's environment) the layout against the world size
and the files the run will read (shards, ``init_from``, encoder folders). Each error is one line naming the key."""
from __future__ import annotations

import math
from pathlib import Path

from difftrain.config import Config, ConfigError, _build, _in_range, _range_text, leaf_fields, read_tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                world_size: int | None = None) -> Config:
    """The config of ``path`` (YAML) with dotted ``overrides``, checked (:func:`validate`). ``world_size``: the job is
    a training launch of that many processes: also check the layout against it and the files the run will read."""
    return from_dict(read_tree(path, overrides), world_size)


def from_dict(tree: dict, world_size: int | None = None) -> Config:
    """A config from its nested dict (YAML's, or ``to_dict``'s as a checkpoint keeps it), checked."""
    cfg = _build(Config, tree)
    validate(cfg, world_size)
    return cfg


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_ranges(cfg: Config) -> None:
    for key, f in leaf_fields():
        v = _get(cfg, key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be a finite number, got {v}")
        b = f.metadata.get("bounds")
        if b and isinstance(v, (int, float)) and not _in_range(v, b):
            raise ConfigError(f"config key '{key}' must be {_range_text(b)}, got {v}")


def _parsed(fn, *args):
    """A data parser's ``ValueError`` (its message names the key) as a ``ConfigError``."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Value ranges (each field's metadata) and cross-checks; with ``world_size`` (a training launch of that many
    processes, from the launcher's environment) also the parallel layout and the batch split against it and the
    files the run reads (:func:`check_launch`). Raises ``ConfigError`` naming the key."""
    _check_ranges(cfg)
    for name in ("dp_replicate", "dp_shard"):
        if getattr(cfg.parallel, name) == 0:
            raise ConfigError(f"config key 'parallel.{name}' must be >= 1 or -1 (inferred), got 0")
    from difftrain.train.apex import check as check_apex

    check_apex(cfg.optim.impl)
    b = cfg.optim.betas
    if (len(b) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b)
            or not all(0.0 <= x < 1.0 for x in b)):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {b!r}")
    if not all(isinstance(p, str) for p in cfg.run.sample_prompts):
        raise ConfigError(f"config key 'run.sample_prompts' must be a list of strings, got {cfg.run.sample_prompts!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in cfg.parallel.pp_bounds):
        raise ConfigError(f"config key 'parallel.pp_bounds' must be a list of block indices >= 1, "
                          f"got {cfg.parallel.pp_bounds!r}")
    if cfg.diffusion.t_min >= cfg.diffusion.t_max:
        raise ConfigError(f"config keys 'diffusion.t_min' = {cfg.diffusion.t_min} and 'diffusion.t_max' = "
                          f"{cfg.diffusion.t_max}: t_min must be < t_max")
    if cfg.data.buckets:  # (the data modules import torch: only when there is something to parse)
        from difftrain.data.images import parse_buckets

        _parsed(parse_buckets, cfg.data.buckets, cfg.data.image_size)
    if cfg.data.filters:
        from difftrain.data.samples import parse_filters

        _parsed(parse_filters, cfg.data.filters)
    if cfg.data.control:
        from difftrain.data.control import check_control

        _parsed(check_control, cfg.data.control, cfg.data.kind)
    if cfg.data.train != "":
        from difftrain.data.spec import parse_spec

        _parsed(parse_spec, cfg.data.train, "data.train")
    if cfg.model.cond == "class" and cfg.model.num_classes <= 0:
        raise ConfigError("config key 'model.num_classes' must be > 0 when model.cond=class")
    if cfg.model.cond == "text" and not cfg.encoders.text:
        raise ConfigError("config key 'encoders.text' must name a text encoder when model.cond=text")
    if (cfg.data.kind == "video" and cfg.model.frames <= 0) or (cfg.data.kind == "image" and cfg.model.frames > 0):
        raise ConfigError(f"config key 'model.frames' = {cfg.model.frames} does not fit data.kind = "
                          f"{cfg.data.kind!r}: video data needs a video model (model.frames > 0) and vice versa")
    if cfg.eval.every and not cfg.eval.ref:
        raise ConfigError("config key 'eval.ref' must name held-out shards (or an image folder) when eval.every > 0")
    from difftrain.eval.extractors import EXTRACTORS

    if cfg.eval.extractor.partition(":")[0] not in EXTRACTORS:
        raise ConfigError(f"config key 'eval.extractor' = {cfg.eval.extractor!r}: the name before ':' must be one of "
                          f"{', '.join(EXTRACTORS)}")
    pc = cfg.parallel
    if pc.pp > 1:
        if cfg.optim.grad_accum != 1:
            raise ConfigError("config key 'optim.grad_accum' must be 1 with parallel.pp > 1: the pipeline's "
                              "micro-batches (parallel.pp_microbatches) are the accumulation")
        if pc.pp_frozen == "fill" and pc.pp_schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"config key 'parallel.pp_frozen' = fill works with pp_schedule gpipe or 1f1b, not "
                              f"{pc.pp_schedule!r}; use balanced (or auto)")
    if pc.sp and (pc.tp == 1 or pc.pp > 1 or pc.tp_impl != "dtensor"):
        raise ConfigError("config key 'parallel.sp' needs parallel.tp > 1 with tp_impl dtensor and pp 1 (sequence "
                          "parallelism across pipeline segments or with megatron's functions is not built yet)")
    if pc.tp != 1 and pc.engine != "fsdp2":
        raise ConfigError(f"config key 'parallel.tp' = {pc.tp} with parallel.engine={pc.engine}: tensor parallelism "
                          "composes with fsdp2 (replicate with dp_shard=1, dp_replicate=N: HSDP as DDP)")
    from difftrain.train.stages import STAGES, stage_args

    from difftrain.train.engine import ENGINES

    if cfg.parallel.engine not in ENGINES:
        raise ConfigError(f"config key 'parallel.engine' = {cfg.parallel.engine!r} is not one of: "
                          f"{', '.join(ENGINES)}")
    if cfg.parallel.engine == "deepspeed" and cfg.parallel.pp > 1:
        raise ConfigError(f"config key 'parallel.pp' = {cfg.parallel.pp} with parallel.engine=deepspeed: the pipeline "
                          "runs on ddp or fsdp2 (DeepSpeed's own pipeline engine is not used); set parallel.pp=1")
    if cfg.parallel.engine != "deepspeed" and cfg.parallel.zero_stage != 1:
        raise ConfigError(f"config key 'parallel.zero_stage' = {cfg.parallel.zero_stage} applies to "
                          f"parallel.engine=deepspeed, not {cfg.parallel.engine!r}")
    for key in ("zero_offload_optimizer", "zero_offload_params"):
        if getattr(cfg.parallel, key) and cfg.parallel.engine != "deepspeed":
            raise ConfigError(f"config key 'parallel.{key}' = true applies to parallel.engine=deepspeed, not "
                              f"{cfg.parallel.engine!r}")
    if cfg.parallel.zero_offload_params and cfg.parallel.zero_stage < 3:
        raise ConfigError(f"config key 'parallel.zero_offload_params' = true needs parallel.zero_stage=3 (the "
                          f"parameters are partitioned only there), not {cfg.parallel.zero_stage}; "
                          f"parallel.zero_offload_optimizer offloads stages 1-3")
    if cfg.stage not in STAGES:
        raise ConfigError(f"config key 'stage' = {cfg.stage!r} is not one of: {', '.join(STAGES)}")
    stage = STAGES[cfg.stage]
    stage_args(cfg)
    from difftrain.finetune.adapt import changes_of

    check_controlnet(cfg, changes_of(cfg))
    stage.check(cfg)
    if cfg.parallel.pp > 1 and stage.pipeline_refusal:
        raise ConfigError(f"config key 'parallel.pp' = {cfg.parallel.pp}: stage '{cfg.stage}' cannot be pipelined: "
                          f"{stage.pipeline_refusal}")
    if cfg.parallel.pp > 1 and stage.carried(cfg) and cfg.parallel.pp_schedule not in ("gpipe", "1f1b"):
        raise ConfigError(f"config key 'parallel.pp_schedule' = {cfg.parallel.pp_schedule!r}: stage '{cfg.stage}' "
                          f"carries its target network's forward through the segments, which runs with one segment "
                          "per rank (gpipe or 1f1b)")
    if cfg.parallel.pp > 1 and cfg.diffusion.assign != "none" and "teacher" in stage.roles(cfg):
        raise ConfigError(f"config key 'diffusion.assign' = '{cfg.diffusion.assign}' with parallel.pp > 1: the "
                          "pipeline runs the teacher's step as frozen work on slices of a micro-batch, and noise "
                          "assignment pairs a whole micro-batch's samples with its noise; use assign none")
    if world_size is not None:
        check_launch(cfg, world_size)


def check_controlnet(cfg: Config, changes: list) -> None:
    """A change that reads control images (``Change.reads_control``: a ControlNet, a T2I-Adapter) trains on them
    (``data.control``) with the pretraining objective, unpipelined; control images are read only for one."""
    controlnet = next((c for c in changes if c.reads_control), None)
    control = cfg.data.control
    if controlnet is None:
        if control:
            raise ConfigError(f"config key 'data.control' = {control!r}: no model change reads control images "
                              "(add adapt: [{kind: controlnet}] or [{kind: t2i_adapter}], or unset it)")
        return
    if not control:
        raise ConfigError(f"config key '{controlnet.key}.kind' = {controlnet.kind} needs control images: set data.control "
                          "(member: each sample's control.png; or a transform such as edges)")
    if cfg.stage != "pretrain":
        raise ConfigError(f"config key '{controlnet.key}.kind' = {controlnet.kind} trains with stage pretrain (the "
                          f"diffusion objective on a frozen base), not {cfg.stage!r}")
    if cfg.parallel.pp > 1:
        raise ConfigError(f"config key 'parallel.pp' = {cfg.parallel.pp}: a {controlnet.kind} ({controlnet.key}) "
                          "feeds the base's blocks from a branch beside them, which the pipeline's cut does not carry")


def check_launch(cfg: Config, world_size: int) -> None:
    """What a training launch of ``world_size`` processes needs, checked before any process group: the parallel
    layout (``ParallelDims.from_config``'s arithmetic), the batch split over data-parallel ranks, accumulation,
    pipeline micro-batches and loader streams, the model and diffusion sections, and the files the run reads
    (local shards, the held-out set, ``init_from``, encoder folders)."""
    from difftrain.parallelism.dims import ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    dp, B, d = dims.dp, cfg.data.batch_size, cfg.data
    of = f"the data-parallel size {dp} (world size {world_size}" + (f" / parallel.pp {dims.pp})" if dims.pp > 1 else ")")
    if B % (dp * cfg.optim.grad_accum):
        raise ConfigError(f"config key 'data.batch_size' = {B} must be a multiple of {of} x optim.grad_accum "
                          f"{cfg.optim.grad_accum}")
    if dims.pp > 1 and (B // dp) % cfg.parallel.pp_microbatches:
        raise ConfigError(f"config key 'parallel.pp_microbatches' = {cfg.parallel.pp_microbatches} must divide the "
                          f"per-rank batch {B // dp} (data.batch_size / {of})")
    streams = d.streams or dp
    if streams % dp or B % streams:
        raise ConfigError(f"config key 'data.streams' = {d.streams} must be a multiple of {of} and divide "
                          f"data.batch_size = {B}")
    from difftrain.data.images import parse_buckets

    if len(parse_buckets(d.buckets, d.image_size)) > 1 and streams != dp:
        raise ConfigError(f"config key 'data.buckets' needs one stream per rank: data.streams = {d.streams} must be 0 "
                          f"or {of}")

    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models import registry
    from difftrain.train.stages import STAGES

    registry.arch_config(cfg.model, text_dim=1)  # the encoder's width is known only once it is loaded
    build_diffusion(cfg.diffusion, pixel_space=not cfg.encoders.vae)

    from difftrain.data.spec import check_local

    if d.train == "":
        raise ConfigError("config key 'data.train' must name the training shards")
    check_local(d.train, "data.train")
    ev = cfg.eval
    if 0 < ev.every <= cfg.run.steps and not Path(ev.ref).is_dir():  # a folder of images, else a shard spec
        check_local(ev.ref, "eval.ref")
    from difftrain.train.sources import Source

    if cfg.init_from:
        Source.parse("init_from", cfg.init_from)
    for key, text in STAGES[cfg.stage].sources(cfg).items():  # e.g. stage_args.teacher
        Source.parse(key, text)
    enc = cfg.encoders
    if cfg.model.cond == "text":
        from difftrain.models.encoders import TEXT_ALIASES

        if enc.text not in TEXT_ALIASES and not _model_folder(enc.text, "text_encoder"):
            raise ConfigError(f"config key 'encoders.text' = '{enc.text}' is neither a known alias "
                              f"({', '.join(TEXT_ALIASES)}) nor a folder with config.json (or text_encoder/config.json)")
    if enc.vae and not _model_folder(enc.vae, "vae"):
        raise ConfigError(f"config key 'encoders.vae' = '{enc.vae}' is not a folder with config.json "
                          "(or vae/config.json): expected a diffusers AutoencoderKL")


def _model_folder(path: str, sub: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() or (p / sub / "config.json").is_file()


