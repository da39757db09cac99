"""Campaign files: named stages, each a config plus overrides plus ``from:`` an earlier stage (docs/CAMPAIGNS.md).

    dir: runs/digits_campaign          # stage NAME runs in DIR/NAME
    config: configs/demo.yaml          # the base config of every training stage (a stage may name its own)
    overrides: [data.num_workers=1]    # applied to every training stage first
    stages:
      teacher: {overrides: [run.steps=3000]}
      pairs:   {kind: pairs, from: teacher, count: 4096, solver: euler, steps: 32, guidance: 2.0}
      rf2:     {stage: reflow, from: pairs, overrides: [run.steps=2000]}
      pd4:     {stage: progressive, from: teacher, stage_args: {steps: 4}}
    eval: {ref: "data/digits/train/{00000..00006}.tar", extractor: digits, nfe: [1, 2, 4, 8]}

A training stage's config is ``config`` with, in this order: the campaign's ``overrides``, ``run.dir=DIR/NAME`` and
``stage=STAGE``, what ``from:`` / ``data_from:`` derive (:meth:`Campaign.derived`), the stage's own ``overrides``,
and its ``stage_args`` as ``stage_args.KEY=VALUE``. Every error is one line naming the stage and the key.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from difftrain.config import SAMPLERS, Config, ConfigError, parse_override
from difftrain.config_checks import load_config

TRAIN, PAIRS = "train", "pairs"
KINDS = (TRAIN, PAIRS)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a folder name: no dots (DIR/NAME.replaced-N is a moved run)
TOP_KEYS = ("dir", "config", "overrides", "stages", "eval")
TRAIN_KEYS = ("kind", "stage", "config", "from", "data_from", "overrides", "stage_args")
# a pairs step's request: difftrain distill pairs' options (difftrain/distill/pairs.py); None = the teacher's own
PAIRS_DEFAULTS = {"count": None, "solver": None, "steps": None, "guidance": None, "batch": 64, "shard_size": 1024,
                  "seed": 0, "dtype": "float32", "prompts": None, "captions_from": None}
PAIRS_KEYS = ("kind", "from", *PAIRS_DEFAULTS)
EVAL_DEFAULTS = {"ref": None, "extractor": "inception", "samples": 1000, "ref_samples": 0,
                 "nfe": [1, 2, 4, 8, 16, 32], "teacher_samplers": ["euler"], "guidance": None, "seed": 0,
                 "batch": 50, "cache_dir": None}


@dataclass
class StageSpec:
    """One entry of ``stages:``: a training stage (``kind: train``) or a pairs step (``kind: pairs``)."""
    name: str
    kind: str = TRAIN
    stage: str = "pretrain"  # the trainer's stage (config key ``stage``): train only
    config: str = ""  # the base config ("" = the campaign's)
    from_: str | None = None
    data_from: str | None = None  # a pairs step whose shards a reflow stage trains on
    overrides: list = field(default_factory=list)
    stage_args: dict = field(default_factory=dict)
    request: dict = field(default_factory=dict)  # pairs: PAIRS_DEFAULTS filled in

    @property
    def upstream(self) -> list[str]:
        return [n for n in (self.from_, self.data_from) if n is not None]


@dataclass
class EvalSpec:
    ref: str
    extractor: str = "inception"
    samples: int = 1000
    ref_samples: int = 0
    nfe: list = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    teacher_samplers: list = field(default_factory=lambda: ["euler"])
    guidance: float | None = None  # None: each model's own CFG scale
    seed: int = 0
    batch: int = 50
    cache_dir: str | None = None


@dataclass
class Campaign:
    path: Path
    dir: Path
    config: str
    overrides: list
    stages: dict  # name -> StageSpec, in file order (the order they run in)
    eval: EvalSpec | None = None

    # ------------------------------------------------------------------------------ layout
    def run_dir(self, name: str) -> Path:
        return self.dir / name

    def training(self) -> list[str]:
        return [n for n, s in self.stages.items() if s.kind == TRAIN]

    def shard_count(self, pairs: str) -> int:
        r = self.stages[pairs].request
        return math.ceil(r["count"] / r["shard_size"])

    def pairs_pattern(self, pairs: str) -> str:
        """The pair shards of a pairs step as a brace pattern (difftrain/distill/pairs.py names them 00000.tar ...)."""
        return f"{self.run_dir(pairs)}/{{00000..{self.shard_count(pairs) - 1:05d}}}.tar"

    def children(self, name: str) -> list[str]:
        return [n for n, s in self.stages.items() if name in s.upstream]

    # ------------------------------------------------------------------------------ configs
    def derived(self, name: str) -> list[tuple[str, object]]:
        """The settings a training stage takes from ``from:`` / ``data_from:`` (applied before its own overrides):

        * pretrain / reflow from a training stage: ``init_from=DIR/FROM@ema``
        * progressive / dmd from a training stage: ``stage_args.teacher=DIR/FROM@ema`` (the student starts from it)
        * consistency from a training stage: ``init_from=`` and ``stage_args.teacher=DIR/FROM@ema`` (distillation;
          the stage's own ``stage_args: {teacher: ""}`` makes it consistency training initialised from FROM)
        * reflow from a pairs step P (or ``data_from: P``): its shards (``data.kind=latent``, ``data.train``),
          ``diffusion.assign=none`` (each pair keeps its own noise), no source-data filters or caption
          requirement (class pairs carry labels only), and, for ``from: P``, ``init_from=`` P's teacher ``@ema``.
        """
        s = self.stages[name]
        out: list[tuple[str, object]] = []
        if s.from_ is not None:
            up = self.stages[s.from_]
            if up.kind == PAIRS:
                out += self._pairs_data(s.from_)
                out.append(("init_from", f"{self.run_dir(up.from_)}@ema"))
            elif s.stage in ("progressive", "dmd", "trajectory"):
                out.append(("stage_args.teacher", f"{self.run_dir(s.from_)}@ema"))
            elif s.stage == "consistency":  # distilled from it, or (stage_args.teacher: "") tuned from it (ECT)
                out += [("init_from", f"{self.run_dir(s.from_)}@ema"),
                        ("stage_args.teacher", f"{self.run_dir(s.from_)}@ema")]
            else:
                out.append(("init_from", f"{self.run_dir(s.from_)}@ema"))
        if s.data_from is not None:
            out += self._pairs_data(s.data_from)
        return out

    def _pairs_data(self, pairs: str) -> list[tuple[str, object]]:
        return [("data.kind", "latent"), ("data.train", self.pairs_pattern(pairs)), ("diffusion.assign", "none"),
                ("data.filters", {}), ("data.require_caption", False)]

    def overrides_for(self, name: str) -> list[str]:
        """Every override of a training stage, in the order applied (see the module docstring)."""
        s = self.stages[name]
        out = [*self.overrides, f"run.dir={self.run_dir(name)}", f"stage={s.stage}"]
        out += [override(k, v) for k, v in self.derived(name)]
        out += list(s.overrides)
        out += [override(f"stage_args.{k}", v) for k, v in s.stage_args.items()]
        return out

    def config_for(self, name: str, world_size: int | None = None) -> Config:
        """The stage's config, validated; ``world_size``: also the launch checks (layout, files it reads), which a
        stage can pass only once the stages it comes from have run."""
        s = self.stages[name]
        base = s.config or self.config
        try:
            return load_config(base, self.overrides_for(name), world_size=world_size)
        except ConfigError as e:
            raise ConfigError(f"campaign stage '{name}': {e}") from None


def override(key: str, value) -> str:
    """``key=value`` as ``parse_override`` reads it back (JSON is YAML; brace patterns survive it)."""
    return f"{key}={json.dumps(value)}"


def shown(key: str, value) -> str:
    """``key=value`` as printed (strings unquoted)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


# ----------------------------------------------------------------------------------- parsing
def load_campaign(path: str | Path) -> Campaign:
    """Read and check a campaign file; ``ConfigError`` in one line naming the stage and key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"campaign file '{p}' does not exist")
    from difftrain.config import _hide_braces, _restore_braces  # shard patterns need no quotes, as in overrides

    hidden, groups = _hide_braces(p.read_text())
    try:
        tree = _restore_braces(yaml.safe_load(hidden), groups)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"campaign file '{p}' is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    return parse_campaign(tree, p)


def parse_campaign(tree, path: Path) -> Campaign:
    where = f"campaign file '{path}'"
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(TOP_KEYS)}")
    _known(tree, TOP_KEYS, where, "")
    if not isinstance(tree.get("dir"), str) or not tree["dir"]:
        raise ConfigError(f"{where}: key 'dir' must name the campaign's folder (stage NAME runs in DIR/NAME)")
    config = tree.get("config", "")
    if not isinstance(config, str):
        raise ConfigError(f"{where}: key 'config' must be a config file path, got {config!r}")
    overrides = _overrides(tree.get("overrides", []), where, "overrides")
    stages_tree = tree.get("stages")
    if not isinstance(stages_tree, dict) or not stages_tree:
        raise ConfigError(f"{where}: key 'stages' must map stage names to their settings")
    stages: dict[str, StageSpec] = {}
    for name, body in stages_tree.items():
        stages[str(name)] = _stage(str(name), body, stages, [str(n) for n in stages_tree], config, where)
    ev = _eval(tree["eval"], where) if tree.get("eval") is not None else None
    return Campaign(path, Path(tree["dir"]), config, overrides, stages, ev)


def _known(tree: dict, keys, where: str, prefix: str) -> None:
    for k in tree:
        if k not in keys:
            raise ConfigError(f"{where}: unknown key '{prefix}{k}'; valid keys: {', '.join(keys)}")


def _overrides(value, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ConfigError(f"{where}: key '{key}' must be a list of 'section.key=value' strings, got {value!r}")
    for o in value:
        try:
            k, _ = parse_override(o)
        except ConfigError as e:
            raise ConfigError(f"{where}: key '{key}': {e}") from None
        if k == "run.dir":
            raise ConfigError(f"{where}: key '{key}' sets run.dir, which the campaign sets (DIR/NAME)")
        if k == "stage":
            raise ConfigError(f"{where}: key '{key}' sets 'stage': give it as the stage's 'stage:' key")
    return list(value)


def _stage(name: str, body, earlier: dict, every: list[str], config: str, where: str) -> StageSpec:
    if not NAME.match(name):
        raise ConfigError(f"{where}: stage name '{name}' must be letters, digits, '_' or '-' (a folder name, "
                          "no dots)")
    where = f"{where}: stage '{name}'"
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ConfigError(f"{where} must be a mapping of its settings, got {body!r}")
    kind = body.get("kind", TRAIN)
    if kind not in KINDS:
        raise ConfigError(f"{where}: key 'kind' = {kind!r} is not one of: {', '.join(KINDS)}")
    spec = StageSpec(name, kind)
    for key in ("from", "data_from"):
        up = body.get(key)
        if up is None:
            continue
        if not isinstance(up, str):
            raise ConfigError(f"{where}: key '{key}' must name an earlier stage, got {up!r}")
        if up == name:
            raise ConfigError(f"{where}: key '{key}' names the stage itself")
        if up not in earlier:
            later = "a later stage" if up in every else "no stage"
            raise ConfigError(f"{where}: key '{key}' = {up!r} names {later}; it must name an earlier stage "
                              f"({', '.join(earlier) or 'none before it'})")
    if kind == PAIRS:
        _known(body, PAIRS_KEYS, where, "")
        up = body.get("from")
        if up is None or earlier[up].kind != TRAIN:
            raise ConfigError(f"{where}: key 'from' must name an earlier training stage (the teacher whose ODE "
                              "makes the pairs)")
        spec.from_ = up
        spec.request = _request(body, where)
        return spec
    _known(body, TRAIN_KEYS, where, "")
    from difftrain.train.stages import STAGES

    spec.stage = body.get("stage", "pretrain")
    if spec.stage not in STAGES:
        raise ConfigError(f"{where}: key 'stage' = {spec.stage!r} is not one of: {', '.join(STAGES)}")
    spec.config = body.get("config", "")
    if not isinstance(spec.config, str):
        raise ConfigError(f"{where}: key 'config' must be a config file path, got {spec.config!r}")
    if not spec.config and not config:
        raise ConfigError(f"{where}: no config: set the campaign's 'config' or the stage's own")
    spec.overrides = _overrides(body.get("overrides", []), where, "overrides")
    spec.stage_args = body.get("stage_args", {}) or {}
    if not isinstance(spec.stage_args, dict):
        raise ConfigError(f"{where}: key 'stage_args' must be a mapping, got {spec.stage_args!r}")
    spec.from_, spec.data_from = body.get("from"), body.get("data_from")
    if spec.from_ is not None and earlier[spec.from_].kind == PAIRS and spec.stage != "reflow":
        raise ConfigError(f"{where}: key 'from' = {spec.from_!r} is a pairs step, which feeds reflow stages only "
                          f"(this stage is '{spec.stage}')")
    if spec.data_from is not None:
        if spec.stage != "reflow" or earlier[spec.data_from].kind != PAIRS:
            raise ConfigError(f"{where}: key 'data_from' names the pairs step a reflow stage trains on "
                              f"(here stage '{spec.stage}' and '{spec.data_from}', a "
                              f"{earlier[spec.data_from].kind} step)")
        if spec.from_ is not None and earlier[spec.from_].kind == PAIRS:
            raise ConfigError(f"{where}: keys 'from' and 'data_from' both name pairs steps; 'from' names the "
                              "stage whose weights it starts from")
    return spec


def _request(body: dict, where: str) -> dict:
    r = {k: body.get(k, v) for k, v in PAIRS_DEFAULTS.items()}
    ints = {"count": 1, "steps": 1, "batch": 1, "shard_size": 1, "seed": 0}
    for k, lo in ints.items():
        v = r[k]
        if v is None and k == "steps":  # the teacher's own
            continue
        if v is None and k == "count":
            raise ConfigError(f"{where}: key 'count' (the number of pairs) is required")
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{where}: key '{k}' must be an integer >= {lo}, got {v!r}")
    if r["solver"] is not None and r["solver"] not in SAMPLERS:
        raise ConfigError(f"{where}: key 'solver' = {r['solver']!r} is not one of: {', '.join(SAMPLERS)}")
    if r["guidance"] is not None and (not isinstance(r["guidance"], (int, float)) or isinstance(r["guidance"], bool)):
        raise ConfigError(f"{where}: key 'guidance' must be a number, got {r['guidance']!r}")
    if r["dtype"] not in ("float32", "float16"):
        raise ConfigError(f"{where}: key 'dtype' = {r['dtype']!r} is not one of: float32, float16")
    if r["shard_size"] % r["batch"]:
        raise ConfigError(f"{where}: key 'shard_size' = {r['shard_size']} must be a multiple of 'batch' = "
                          f"{r['batch']} (a shard holds whole chunks)")
    if r["prompts"] is not None and (not isinstance(r["prompts"], list)
                                     or not all(isinstance(x, str) for x in r["prompts"])):
        raise ConfigError(f"{where}: key 'prompts' must be a list of captions, got {r['prompts']!r}")
    if r["captions_from"] is not None and not isinstance(r["captions_from"], str):
        raise ConfigError(f"{where}: key 'captions_from' must be a shard spec (a string), got {r['captions_from']!r}")
    return r


def _eval(tree, where: str) -> EvalSpec:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: key 'eval' must be a mapping, got {tree!r}")
    _known(tree, tuple(EVAL_DEFAULTS), where, "eval.")
    v = {k: tree.get(k, d) for k, d in EVAL_DEFAULTS.items()}
    if not isinstance(v["ref"], str) or not v["ref"]:
        raise ConfigError(f"{where}: key 'eval.ref' must name the reference images (a shard spec or a folder)")
    if not isinstance(v["extractor"], str):
        raise ConfigError(f"{where}: key 'eval.extractor' must be a string, got {v['extractor']!r}")
    for k, lo in (("samples", 2), ("ref_samples", 0), ("seed", 0), ("batch", 1)):
        if not isinstance(v[k], int) or isinstance(v[k], bool) or v[k] < lo:
            raise ConfigError(f"{where}: key 'eval.{k}' must be an integer >= {lo}, got {v[k]!r}")
    nfe = v["nfe"]
    if (not isinstance(nfe, list) or not nfe
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in nfe)):
        raise ConfigError(f"{where}: key 'eval.nfe' must be a list of integers >= 1, got {nfe!r}")
    ts = v["teacher_samplers"]
    if not isinstance(ts, list) or not ts or not all(isinstance(s, str) for s in ts):
        raise ConfigError(f"{where}: key 'eval.teacher_samplers' must be a list of samplers, got {ts!r}")
    from difftrain.eval.generator import sampler_name

    try:
        v["teacher_samplers"] = [sampler_name(s) for s in ts]
    except ConfigError as e:
        raise ConfigError(f"{where}: key 'eval.teacher_samplers': {e}") from None
    if v["guidance"] is not None and (not isinstance(v["guidance"], (int, float)) or isinstance(v["guidance"], bool)):
        raise ConfigError(f"{where}: key 'eval.guidance' must be a number, got {v['guidance']!r}")
    return EvalSpec(**v)
