"""What a campaign does with each stage: train, resume, skip, rerun or refuse it (docs/CAMPAIGNS.md).

* **finished** (training: its newest complete checkpoint is at ``run.steps`` or beyond; pairs: every shard is
  there) -> skipped, once its inputs are checked: the checkpoint's saved config against the campaign's
  (``config.config_changes``, identity fields), the frozen sources it recorded (train state ``frozen``) and the
  inputs the campaign recorded when it started the stage (``DIR/NAME/campaign.json``: the fingerprint of its
  ``init_from`` run, the pair shards it trains on; for a pairs step its teacher and request) against their
  current fingerprints. A change is refused in one line naming the stage and what changed, unless ``--rerun NAME``.
* **interrupted** (a complete checkpoint short of ``run.steps``, or some pair shards) -> resumed after the same
  checks (the trainer's resume guard checks again); a budget change (more ``run.steps``) makes a finished stage
  resume and continue.
* **nothing yet** -> trained from the start.
* ``--rerun NAME`` -> ``DIR/NAME`` is moved aside to ``DIR/NAME.replaced-N`` and the stage trains again.

A stage that trains in this campaign (new, resumed or rerun) changes what comes after it: a stage whose
``from`` / ``data_from`` does so and that already has output is refused up front, before anything runs, until it is
rerun too. Every rank decides the same from the same files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from difftrain.campaign.spec import PAIRS, Campaign
from difftrain.config import IDENTITY, BUDGET, Config, ConfigError, config_changes

RECORD = "campaign.json"  # DIR/NAME/campaign.json: the inputs a stage started from
TRAIN_ACTIONS = ("train", "resume", "rerun")  # the actions that run the stage (and change what it feeds)


@dataclass
class State:
    """What is on disk for a stage."""
    output: bool = False  # training: a complete checkpoint; pairs: encode_info.json
    finished: bool = False
    step: int | None = None  # training: the newest complete checkpoint's step
    train_state: dict = field(default_factory=dict)
    detail: str = "nothing yet"


@dataclass
class Decision:
    name: str
    action: str  # train | resume | skip | rerun | leave (not selected) | refuse
    why: str
    state: State
    notes: list = field(default_factory=list)  # budget changes and the like: printed, not refused

    @property
    def runs(self) -> bool:
        return self.action in TRAIN_ACTIONS


# ---------------------------------------------------------------------------------- on disk
def training_state(run_dir: Path, cfg: Config) -> State:
    from difftrain.train import checkpoint as ckpt

    for step, d in reversed(ckpt.complete_checkpoints(run_dir / "checkpoints")):
        try:
            state = ckpt.read_train_state(d)
        except ckpt.CheckpointError:  # the trainer falls back to the previous complete one too
            continue
        done = step >= cfg.run.steps
        detail = f"finished (step {step})" if done else f"interrupted at step {step} of {cfg.run.steps}"
        return State(True, done, step, state, detail)
    return State()


def pairs_state(c: Campaign, name: str) -> State:
    from difftrain.data.latents import INFO
    from difftrain.distill.pairs import shard_name

    d = c.run_dir(name)
    if not (d / INFO).is_file():
        return State()
    n = c.shard_count(name)
    have = sum((d / shard_name(k)).is_file() for k in range(n))
    return State(True, have == n, None, {}, f"{have}/{n} shards" + (" (finished)" if have == n else ""))


def stage_state(c: Campaign, name: str, cfg: Config | None) -> State:
    return pairs_state(c, name) if c.stages[name].kind == PAIRS else training_state(c.run_dir(name), cfg)


# ------------------------------------------------------------------------------------ inputs
def inputs(c: Campaign, name: str, cfg: Config | None) -> dict:
    """The current fingerprints of what a stage starts from (recorded in ``campaign.json`` when it starts): a
    pairs step's teacher and request; a training stage's ``init_from`` and the pair shards it trains on. The
    frozen modules are recorded by the trainer itself (train state ``frozen``)."""
    from difftrain.train.sources import Source

    s = c.stages[name]
    if s.kind == PAIRS:
        return {"teacher": Source.parse(f"stages.{name}.from", f"{c.run_dir(s.from_)}@ema").fingerprint(),
                "request": s.request}
    out = {}
    if cfg.init_from:
        out["init_from"] = Source.parse("init_from", cfg.init_from).fingerprint()
    for up in s.upstream:
        if c.stages[up].kind == PAIRS:
            out["data"] = {"pairs": up, "sha256": _info_hash(c.run_dir(up))}
    return json.loads(json.dumps(out))


def _info_hash(pairs_dir: Path) -> str:
    from difftrain.data.latents import INFO

    return hashlib.sha256((pairs_dir / INFO).read_bytes()).hexdigest()[:16]


def write_record(c: Campaign, name: str, cfg: Config | None) -> None:
    d = c.run_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    rec = {"campaign": str(c.path), "stage": name, "kind": c.stages[name].kind, "inputs": inputs(c, name, cfg)}
    tmp = d / (RECORD + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(d / RECORD)


def add_wall_time(c: Campaign, name: str, seconds: float) -> None:
    """Add ``seconds`` of training to the stage's record (``wall_s``: summed over the launches that trained it)."""
    rec = read_record(c, name)
    if rec is None:
        return
    rec["wall_s"] = round(float(rec.get("wall_s", 0.0)) + seconds, 1)
    tmp = c.run_dir(name) / (RECORD + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(c.run_dir(name) / RECORD)


def read_record(c: Campaign, name: str) -> dict | None:
    f = c.run_dir(name) / RECORD
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("inputs"), dict) else None


def _fp(v) -> str:
    if isinstance(v, dict) and {"source", "step", "sha256"} <= v.keys():
        return f"{v['source']} (step {v['step']}, fingerprint {v['sha256']})"
    if isinstance(v, dict) and "pairs" in v:
        return f"pairs '{v['pairs']}' (encode_info {v.get('sha256')})"
    return "none" if v is None else json.dumps(v)


def _input_changes(c: Campaign, name: str, cfg: Config | None, st: State) -> list[str]:
    """What differs between the inputs a stage was started from and the current ones."""
    out = []
    try:
        now = inputs(c, name, cfg)
    except ConfigError as e:  # an input is gone (e.g. a run dir that no longer has a checkpoint)
        return [f"an input no longer reads ({e})"]
    rec = read_record(c, name)
    if rec is not None:
        then = rec["inputs"]
        for k in sorted(set(then) | set(now)):
            a, b = then.get(k), now.get(k)
            if a == b:
                continue
            if k == "request":
                out += [f"{kk} {a.get(kk)!r} -> {b.get(kk)!r}" for kk in sorted(set(a) | set(b))
                        if a.get(kk) != b.get(kk)]
            else:
                out.append(f"{k} was {_fp(a)}, now {_fp(b)}")
    elif c.stages[name].kind == PAIRS:  # written without the campaign: its encode_info.json's request
        from difftrain.data.latents import INFO

        info = json.loads((c.run_dir(name) / INFO).read_text()).get("pairs", {})
        req = c.stages[name].request
        out += [f"{k} {info.get(k)!r} -> {v!r}" for k, v in req.items()
                if v is not None and k != "prompts" and info.get(k) != v]
    for module, then in (st.train_state.get("frozen") or {}).items():  # a frozen module is its source's weights
        from difftrain.train.sources import Source

        try:
            now_fp = Source.parse(f"frozen module '{module}'", then["source"]).fingerprint()
        except ConfigError as e:
            out.append(f"frozen module '{module}' no longer reads ({e})")
            continue
        if now_fp != then:
            out.append(f"frozen module '{module}' was {_fp(then)}, now {_fp(now_fp)}")
    return out


# ---------------------------------------------------------------------------------- deciding
def decide(c: Campaign, configs: dict, rerun=(), only=None, strict: bool = True) -> list[Decision]:
    """One decision per stage, in order. ``configs``: each training stage's config (``Campaign.config_for``).
    ``strict``: raise the first refusal as a ``ConfigError`` (a run); else record it (a dry run's plan)."""
    rerun, only = set(rerun), (set(only) if only else None)
    out: dict[str, Decision] = {}
    for name, s in c.stages.items():
        cfg = configs.get(name)
        st = stage_state(c, name, cfg)
        d = _decide(c, name, cfg, st, out, rerun, only)
        if d.action == "refuse" and strict:
            raise ConfigError(d.why)
        out[name] = d
    return list(out.values())


def _decide(c: Campaign, name: str, cfg, st: State, done: dict, rerun: set, only: set | None) -> Decision:
    s = c.stages[name]
    if only is not None and name not in only and name not in rerun:
        return Decision(name, "leave", f"not selected by --only ({st.detail})", st)
    for u in s.upstream:
        if done[u].action == "refuse":
            return Decision(name, "refuse", f"campaign stage '{name}' needs '{u}', which is refused", st)
        if done[u].action == "leave" and not done[u].state.finished:
            return Decision(name, "refuse", f"campaign stage '{name}' needs '{u}', which is not finished "
                                            f"({done[u].state.detail}); select it too (--only ... {u})", st)
    if name in rerun:
        if st.output:
            return Decision(name, "rerun", f"--rerun: {c.run_dir(name)} ({st.detail}) is moved aside", st)
        return Decision(name, "train", "--rerun, nothing there yet", st)
    if not st.output:
        return Decision(name, "train", "nothing there yet", st)
    changes, notes = [], []
    if s.kind != PAIRS:
        saved = st.train_state.get("config")
        if isinstance(saved, dict):
            for ch in config_changes(saved, cfg):
                if ch.tag == IDENTITY and not cfg.run.allow_config_change:
                    changes.append(str(ch))
                elif ch.tag in (IDENTITY, BUDGET):
                    notes.append(f"{ch.tag} change {ch}" + (" (allowed by run.allow_config_change)"
                                                           if ch.tag == IDENTITY else ""))
    moving = [u for u in s.upstream if done[u].runs]
    if moving:
        changes += [f"'{u}', which it comes from, trains again in this campaign ({done[u].why})" for u in moving]
    else:
        changes += _input_changes(c, name, cfg, st)
    if changes:
        what = f"was trained (step {st.step})" if s.kind != PAIRS else "wrote its pairs"
        return Decision(name, "refuse", f"campaign stage '{name}' has changed since it {what}: "
                                        f"{'; '.join(changes)}; train it again with --rerun {name} (its folder is "
                                        f"kept as {name}.replaced-N) or restore its settings", st, notes)
    if st.finished:
        return Decision(name, "skip", st.detail, st, notes)
    return Decision(name, "resume", st.detail, st, notes)


def move_aside(path: Path) -> Path:
    """``DIR/NAME`` -> ``DIR/NAME.replaced-N`` (the first N free); returns the new path."""
    n = 1
    while (target := path.with_name(f"{path.name}.replaced-{n}")).exists():
        n += 1
    path.rename(target)
    return target
