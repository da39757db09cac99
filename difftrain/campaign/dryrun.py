"""``difftrain campaign FILE --dry-run``: every stage built on the meta device, and the plan printed.

No process group, nothing trained, no file needs to exist (data shards, teacher runs, encoder folders): each
training stage's config is loaded with its value checks only (not the launch checks), and its modules are built on
the meta device: by the stage class itself (``Stage.modules()`` over meta shared parts) where it can be built without
files, else from what the class declares (its ``trained`` module, trainable, in the run's architecture; each of
its ``sources`` a frozen module, in the architecture of the campaign stage it names). The text encoder's width
(the backbone's ``text_dim``) comes from its folder's config.json when there is one, else ``--text-dim``, else the
widths of known encoders (MiniLM 384, CLIP-L 768, T5-XXL 4096).

Per stage the plan shows its modules (name, role, architecture, parameters), the memory per rank of their state
(trainable: fp32 weights, gradients, AdamW's two moments and the EMA, 20 bytes a parameter; frozen: the weights,
4 bytes a parameter; with ``parallel.engine=fsdp2`` divided by the shard count ``dp_shard``; activations are
not counted), the layout at the planned world size (``--world-size``, default 8 ranks per node x ``--nodes``) with
the pipeline's segments when ``parallel.pp > 1`` (the trainer's partitioner, ``train/pipeline.segment_bounds``),
what the campaign would do with it (decide.py) and the chain of stages.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftrain.campaign.spec import PAIRS, Campaign, shown
from difftrain.config import Config, ConfigError
from difftrain.errors import DifftrainError

GPUS_PER_NODE = 8
TRAINABLE_BYTES = 20  # per parameter: fp32 weights 4 + gradients 4 + AdamW exp_avg, exp_avg_sq 8 + EMA 4
FROZEN_BYTES = 4  # fp32 weights
# hidden width of known text encoders, by a piece of their name (lower case), when their folder is absent
TEXT_WIDTHS = (("minilm", 384), ("clip-vit-large", 768), ("clip-l", 768), ("clip_l", 768),
               ("t5-v1_1-xxl", 4096), ("t5-xxl", 4096), ("t5_xxl", 4096), ("t5xxl", 4096))


@dataclass
class ModulePlan:
    name: str
    role: str  # trainable | frozen
    arch: str  # e.g. "DiT-XL/2 (dit)"
    params: int
    source: str = ""  # where its weights come from
    sharded: int = 1  # FSDP2 shard count applied to it
    per_rank: int = 0  # parameters on the busiest rank (after pipeline segments and sharding)

    @property
    def bytes_per_rank(self) -> int:
        return self.per_rank * (TRAINABLE_BYTES if self.role == "trainable" else FROZEN_BYTES)


@dataclass
class StagePlan:
    name: str
    kind: str  # a training stage's config key 'stage', or 'pairs'
    action: str = ""
    why: str = ""
    derived: list = field(default_factory=list)
    modules: list = field(default_factory=list)  # ModulePlan
    layout: str = ""
    segments: list = field(default_factory=list)  # pp > 1: (pp rank, [(lo, hi, params)])
    detail: str = ""  # pairs: the request
    arch: tuple | None = None  # (arch, acfg) of the served module: what a stage taking it as teacher builds

    @property
    def bytes_per_rank(self) -> int:
        return sum(m.bytes_per_rank for m in self.modules)


# ----------------------------------------------------------------------------- text width
def text_width(name: str, given: int | None = None) -> tuple[int, str]:
    """(hidden width, where it came from) of ``encoders.text``."""
    from difftrain.models.encoders import TEXT_ALIASES

    root = Path(TEXT_ALIASES[name]() if name in TEXT_ALIASES else name)
    for f in (root / "text_encoder" / "config.json", root / "config.json"):
        if f.is_file():
            meta = json.loads(f.read_text())
            width = (meta.get("text_config") or {}).get("hidden_size") if "text_config" in meta else None
            width = width or meta.get("hidden_size") or meta.get("d_model")
            if isinstance(width, int):
                return width, str(f)
    if given:
        return given, "--text-dim"
    low = name.lower()
    for piece, width in TEXT_WIDTHS:
        if piece in low:
            return width, f"known width of '{piece}'"
    raise ConfigError(f"config key 'encoders.text' = '{name}': no config.json there and not a known encoder "
                      f"({', '.join(sorted({p for p, _ in TEXT_WIDTHS}))}): give its width with --text-dim")


def encoder_params(cfg: Config) -> list[tuple[str, str, int | None]]:
    """(name, what, parameters or None when its folder is absent) of the run's frozen encoders."""
    out = []
    if cfg.model.cond == "text":
        out.append(("text encoder", Path(cfg.encoders.text).name, _text_params(cfg.encoders.text)))
    if cfg.encoders.vae:
        out.append(("vae", Path(cfg.encoders.vae).name, _vae_params(cfg.encoders.vae)))
    return out


def _text_params(name: str) -> int | None:
    from difftrain.models.encoders import TEXT_ALIASES

    root = Path(TEXT_ALIASES[name]() if name in TEXT_ALIASES else name)
    sub = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    if not (sub / "config.json").is_file():
        return None
    try:
        import transformers as tf

        kind = json.loads((sub / "config.json").read_text()).get("model_type", "")
        if kind.startswith("clip"):
            cls, config = tf.CLIPTextModel, tf.CLIPTextConfig.from_pretrained(str(sub))
        elif kind in ("t5", "mt5", "umt5"):
            cls, config = tf.T5EncoderModel, tf.AutoConfig.from_pretrained(str(sub))
        else:
            cls, config = tf.AutoModel, tf.AutoConfig.from_pretrained(str(sub))
        with torch.device("meta"):
            model = cls.from_config(config) if cls is tf.AutoModel else cls(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a folder the dry run cannot read: the count is left out, the plan goes on
        return None


def _vae_params(path: str) -> int | None:
    root = Path(path)
    sub = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (sub / "config.json").is_file():
        return None
    try:
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            model = AutoencoderKL.from_config(AutoencoderKL.load_config(str(sub)))
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


# --------------------------------------------------------------------------------- modules
def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _label(module, own: tuple) -> str:
    """``DiT-XL/2 (dit)`` for the run's own architecture, else the architecture and its size."""
    from difftrain.models import registry

    arch, acfg = registry._arch_name(module), module.config
    if (arch, acfg) == own[:2]:
        return f"{own[2]} ({arch})"
    size = [f"{k} {getattr(acfg, k)}" for k in ("depth", "hidden_size") if hasattr(acfg, k)]
    return f"{arch} ({', '.join(size)})" if size else arch


def stage_modules(c: Campaign, cfg: Config, arch: str, acfg, plans: dict) -> list[tuple]:
    """(name, role, meta module, weights source text) of a training stage's declared modules."""
    from difftrain.train.stages import STAGES

    try:  # the stage itself, over meta shared parts: works where every source it reads exists
        from difftrain.diffusion.diffusion import build_diffusion
        from difftrain.train.build import Shared
        from difftrain.train.stages import stage_args

        shared = Shared.parts(cfg, torch.device("meta"), arch=arch, acfg=acfg,
                              diffusion=build_diffusion(cfg.diffusion, pixel_space=not cfg.encoders.vae))
        stage = STAGES[cfg.stage](shared, stage_args(cfg))
        return [(n, spec.role, spec.meta(), str(spec.source) if spec.source is not None else "seeded init")
                for n, spec in stage.modules().items()]
    except (ConfigError, DifftrainError, OSError):  # a source it reads is not there (yet)
        pass
    from difftrain.models import registry

    cls = STAGES[cfg.stage]
    sources = {"init_from": cfg.init_from, **cls.sources(cfg)}
    out = []
    for name, (role, key) in cls.roles(cfg).items():  # the stage's declared roles, read without any file
        text = sources.get(key, "")
        if role == "trainable":
            out.append((name, role, registry.build(arch, acfg),
                        text or ("the stage's default source" if len(sources) > 1 else "seeded init")))
        elif role == "derived":  # key: the trainable module it copies
            out.append((name, role, registry.build(arch, acfg), f"a copy of '{key}'"))
        else:
            a, ac = _source_arch(c, text, plans, (arch, acfg))
            out.append((name, role, registry.build(a, ac), text))
    return out


def _source_arch(c: Campaign, text: str, plans: dict, own: tuple) -> tuple:
    """(arch, acfg) of a weight source: a campaign stage's (its plan), a run or export on disk, else the run's own."""
    path = Path(text.rpartition("@")[0] if "@" in text else text)
    if path.parent == c.dir and path.name in plans and plans[path.name].arch is not None:
        return plans[path.name].arch
    try:
        from difftrain.train.sources import Source

        found = Source.parse("source", text).model_config()
        if found is not None:
            return found
    except (ConfigError, FileNotFoundError, OSError):
        pass
    return own


# ---------------------------------------------------------------------------------- layout
def _layout(cfg: Config, world: int, trained: str, whole, modules: list[ModulePlan]) -> tuple[str, list]:
    """The layout line and, with ``parallel.pp > 1``, each pp rank's segments of the ``trained`` module ``whole``;
    sets each module's sharding and parameters on the busiest rank."""
    from difftrain.parallelism.dims import ParallelDims

    pc = cfg.parallel
    dims = ParallelDims.from_config(pc, world)
    shard = dims.dp_shard if pc.engine == "fsdp2" else 1
    dp = dims.dp
    per = cfg.data.batch_size / dp
    text = (f"world {world} = pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} "
            f"({pc.engine}); data-parallel over {dp} ranks: data.batch_size {cfg.data.batch_size} = {dp} x "
            f"{per:g} per rank" + (f" in {cfg.optim.grad_accum} micro-batches" if cfg.optim.grad_accum > 1 else ""))
    if cfg.data.batch_size % (dp * cfg.optim.grad_accum):
        text += f" (NOT a multiple of {dp} x optim.grad_accum {cfg.optim.grad_accum}: the launch would refuse it)"
    segments = []
    trained_busiest = None
    if dims.pp > 1:
        from difftrain.parallelism.pipeline.runtime import segment_ids
        from difftrain.parallelism.pipeline.segments import make_segment
        from difftrain.train.pipeline import segment_bounds

        per_rank = 2 if pc.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1
        bounds = segment_bounds(pc, whole, dims.pp * per_rank, cfg.model.frames, cfg.encoders.text_max_length)
        sizes = [_params(make_segment(copy.deepcopy(whole), lo, hi)) for lo, hi in bounds]
        for r in range(dims.pp):
            ids = segment_ids(pc.pp_schedule, r, dims.pp, len(bounds))
            segments.append((r, [(bounds[i][0], bounds[i][1], sizes[i]) for i in ids]))
        trained_busiest = max(sum(p for _, _, p in segs) for _, segs in segments)
        text += f"; pipeline: {len(bounds)} segments ({pc.pp_schedule}) over {dims.pp} pp ranks"
    for m in modules:
        on_rank = trained_busiest if (trained_busiest is not None and m.name == trained) else m.params
        m.sharded = shard if (m.role == "trainable" or m.source.endswith(("@ema", "@raw"))) else 1
        m.per_rank = -(-on_rank // m.sharded)
    return text, segments


# ------------------------------------------------------------------------------------ plan
def plan(c: Campaign, world_size: int | None = None, nodes: int = 1, text_dim: int | None = None, rerun=(),
         only=()) -> list[StagePlan]:
    from difftrain.campaign.decide import decide
    from difftrain.models import registry
    from difftrain.train.stages import STAGES

    world = world_size or GPUS_PER_NODE * nodes
    configs = {n: c.config_for(n) for n in c.training()}
    decisions = {d.name: d for d in decide(c, configs, rerun, only, strict=False)}
    plans: dict[str, StagePlan] = {}
    for name, s in c.stages.items():
        d = decisions[name]
        if s.kind == PAIRS:
            r = s.request
            how = ", ".join(f"{k} {len(v)} captions" if k == "prompts" else f"{k} {v}" for k, v in r.items()
                            if v is not None and k != "count")
            p = StagePlan(name, "pairs", d.action, d.why, detail=f"{r['count']} pairs of '{s.from_}' ({how}) -> "
                                                                 f"{c.pairs_pattern(name)}")
            plans[name] = p
            continue
        cfg = configs[name]
        try:
            width, _ = text_width(cfg.encoders.text, text_dim) if cfg.model.cond == "text" else (0, "")
            arch, acfg = registry.arch_config(cfg.model, width)
        except ConfigError as e:
            raise ConfigError(f"campaign stage '{name}': {e}") from None
        p = StagePlan(name, cfg.stage, d.action, d.why, derived=[shown(k, v) for k, v in c.derived(name)],
                      arch=(arch, acfg))
        mods = stage_modules(c, cfg, arch, acfg, plans)
        own = (arch, acfg, cfg.model.name)
        p.modules = [ModulePlan(n, role, _label(m, own), _params(m), src) for n, role, m, src in mods]
        for n, what, count in encoder_params(cfg):
            p.modules.append(ModulePlan(n, "frozen", what, count or 0, "encoders (replicated)"))
        trained = STAGES[cfg.stage].trained
        whole = next(m for n, _, m, _ in mods if n == trained)
        try:
            p.layout, p.segments = _layout(cfg, world, trained, whole, p.modules)
        except ConfigError as e:
            raise ConfigError(f"campaign stage '{name}' at world size {world}: {e}") from None
        served = next((m for n, _, m, _ in mods if n == STAGES[cfg.stage].served), None)
        if served is not None:  # what a stage taking this one as its teacher builds
            p.arch = (registry._arch_name(served), served.config)
        plans[name] = p
    return list(plans.values())


# ---------------------------------------------------------------------------------- printing
def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def chain(c: Campaign) -> list[str]:
    """The stages as a tree by ``from:`` (``data_from`` noted)."""
    lines = []

    def walk(name: str, depth: int) -> None:
        s = c.stages[name]
        what = "pairs" if s.kind == PAIRS else s.stage
        extra = f", data from {s.data_from}" if s.data_from else ""
        lines.append(f"  {'  ' * depth}{'└─ ' if depth else ''}{name} ({what}{extra})")
        for child in c.stages:
            if c.stages[child].from_ == name:
                walk(child, depth + 1)

    for name, s in c.stages.items():
        if s.from_ is None:
            walk(name, 0)
    return lines


def dry_run(c: Campaign, **kw) -> str:
    plans = plan(c, **kw)
    world = kw.get("world_size") or GPUS_PER_NODE * kw.get("nodes", 1)
    out = [f"campaign {c.path} (dry run: nothing trained; {world} ranks planned): {len(plans)} stages in {c.dir}"]
    for p in plans:
        out.append(f"\n[{p.name}] {p.kind}: would {p.action} ({p.why})")
        if p.kind == "pairs":
            out.append(f"  {p.detail}")
            continue
        if p.derived:
            out.append(f"  from '{c.stages[p.name].from_ or c.stages[p.name].data_from}': {' '.join(p.derived)}")
        out.append(f"  {'module':<14} {'role':<10} {'architecture':<28} {'params':>10} {'per rank':>10} "
                   f"{'memory/rank':>12}  weights from")
        for m in p.modules:
            known = m.params > 0 or m.role == "trainable"
            out.append(f"  {m.name:<14} {m.role:<10} {m.arch[:28]:<28} {_count(m.params) if known else '?':>10} "
                       f"{_count(m.per_rank) if known else '?':>10} {_gb(m.bytes_per_rank) if known else '?':>12}  "
                       f"{m.source}" + (f" (sharded over {m.sharded})" if m.sharded > 1 else ""))
        missing = [m.name for m in p.modules if m.params == 0 and m.role == "frozen"]
        out.append(f"  memory per rank: {_gb(p.bytes_per_rank)} of module state (trainable 20 B/param: weights, "
                   f"grads, AdamW moments, EMA; frozen 4 B/param; activations not counted"
                   + (f"; {', '.join(missing)} not counted: folder absent" if missing else "") + ")")
        out.append(f"  layout: {p.layout}")
        for r, segs in p.segments:
            shown_segs = ", ".join(f"blocks [{lo}, {hi}) {_count(n)} params" for lo, hi, n in segs)
            out.append(f"    pp rank {r}: {shown_segs}")
    out.append("\nchain:")
    out += chain(c)
    return "\n".join(out)
