"""Campaign files (difftrain/campaign/): parsing errors in one line naming the stage and key, what ``from:``
derives, the dry-run plan of both shipped recipes (on the meta device), and the skip / resume / refuse / rerun
decisions on real checkpoint folders (written by the checkpoint module itself, in-process)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from difftrain.campaign.decide import decide, move_aside, write_record
from difftrain.campaign.dryrun import plan, text_width
from difftrain.campaign.results import steps_for_nfe
from difftrain.campaign.spec import load_campaign, parse_campaign
from difftrain.config import ConfigError, to_dict
from difftrain.models import registry
from difftrain.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def campaign(tree: dict, tmp_path: Path | None = None):
    tree = {"dir": str(tmp_path / "c") if tmp_path else "runs/c", "config": "configs/demo.yaml", **tree}
    return parse_campaign(tree, Path("test.yaml"))


def refused(tree: dict) -> str:
    with pytest.raises(ConfigError) as e:
        campaign(tree)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ parsing
def test_parsing_errors_are_one_line_naming_the_stage_and_key():
    msg = refused({"stages": {"teacher": {}, "pd": {"stage": "progressive", "from": "nope"}}})
    assert "stage 'pd'" in msg and "key 'from' = 'nope' names no stage" in msg
    msg = refused({"stages": {"pd": {"stage": "progressive", "from": "teacher"}, "teacher": {}}})
    assert "stage 'pd'" in msg and "'teacher' names a later stage" in msg and "earlier" in msg
    msg = refused({"stages": {"teacher": {}, "p": {"kind": "pears", "from": "teacher", "count": 8}}})
    assert "stage 'p'" in msg and "key 'kind' = 'pears' is not one of: train, pairs" in msg
    msg = refused({"stages": {"teacher.v2": {}}})
    assert "stage name 'teacher.v2'" in msg
    msg = refused({"stages": {"teacher": {"stage": "distill"}}})
    assert "stage 'teacher'" in msg and "key 'stage' = 'distill'" in msg and "pretrain" in msg
    msg = refused({"stages": {"teacher": {"overides": ["run.steps=3"]}}})
    assert "stage 'teacher'" in msg and "unknown key 'overides'" in msg
    msg = refused({"stages": {"teacher": {}, "p": {"kind": "pairs", "from": "teacher"}}})
    assert "stage 'p'" in msg and "key 'count'" in msg
    msg = refused({"stages": {"teacher": {}, "p": {"kind": "pairs", "from": "teacher", "count": 8},
                              "pd": {"stage": "progressive", "from": "p"}}})
    assert "stage 'pd'" in msg and "key 'from' = 'p' is a pairs step" in msg
    msg = refused({"stages": {"teacher": {"overrides": ["run.dir=/elsewhere"]}}})
    assert "stage 'teacher'" in msg and "run.dir" in msg
    msg = refused({"stages": {"teacher": {}}, "eval": {"ref": "x", "nfe": [1, 0]}})
    assert "eval.nfe" in msg


def test_a_stage_config_error_names_the_stage(tmp_path):
    c = campaign({"stages": {"teacher": {}, "pd": {"stage": "progressive", "from": "teacher"}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"^campaign stage 'pd': config key 'diffusion.target'"):
        c.config_for("pd")  # the demo's velocity target: a progressive student predicts x, v or both


def test_shard_patterns_need_no_quotes_in_a_campaign_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dir: runs/c\nconfig: configs/demo.yaml\noverrides: [data.train=d/{00000..00006}.tar]\n"
                 "stages: {teacher: {}}\neval: {ref: d/{00000..00000}.tar}\n")
    c = load_campaign(f)
    assert c.overrides == ["data.train=d/{00000..00006}.tar"] and c.eval.ref == "d/{00000..00000}.tar"


# ------------------------------------------------------------------------------------ from:
STAGES = {
    "teacher": {"overrides": ["run.steps=30"]},
    "pairs": {"kind": "pairs", "from": "teacher", "count": 4096, "solver": "euler", "steps": 32},
    "rf2": {"stage": "reflow", "from": "pairs"},
    "rf2_1step": {"stage": "reflow", "from": "rf2", "data_from": "pairs", "stage_args": {"grid": 1}},
    "ft": {"from": "teacher", "overrides": ["optim.lr=1e-5"]},
    "pd4": {"stage": "progressive", "from": "teacher", "stage_args": {"steps": 4},
            "overrides": ["diffusion.target=v"]},
    "pd2": {"stage": "progressive", "from": "pd4", "stage_args": {"steps": 2},
            "overrides": ["diffusion.target=v", "stage_args.teacher_guidance=2.0"]},
}


def test_from_derives_per_kind_and_own_overrides_come_after():
    c = campaign({"overrides": ["data.num_workers=0"], "stages": STAGES})
    d = Path("runs/c")
    shards = f"{d}/pairs/{{00000..00003}}.tar"  # 4096 pairs, 1024 a shard
    pairs_data = [("data.kind", "latent"), ("data.train", shards), ("diffusion.assign", "none"),
                  ("data.filters", {}), ("data.require_caption", False)]
    assert c.derived("teacher") == []
    assert c.derived("rf2") == pairs_data + [("init_from", f"{d}/teacher@ema")]
    assert c.derived("rf2_1step") == [("init_from", f"{d}/rf2@ema")] + pairs_data
    assert c.derived("ft") == [("init_from", f"{d}/teacher@ema")]
    assert c.derived("pd4") == [("stage_args.teacher", f"{d}/teacher@ema")]
    assert c.derived("pd2") == [("stage_args.teacher", f"{d}/pd4@ema")]

    cfg = c.config_for("rf2_1step")
    assert cfg.run.dir == f"{d}/rf2_1step" and cfg.stage == "reflow" and cfg.stage_args == {"grid": 1}
    assert cfg.data.kind == "latent" and cfg.data.train == shards and cfg.init_from == f"{d}/rf2@ema"
    assert cfg.diffusion.assign == "none" and cfg.data.num_workers == 0
    cfg = c.config_for("pd2")
    assert cfg.stage_args == {"teacher": f"{d}/pd4@ema", "steps": 2, "teacher_guidance": 2.0}
    assert cfg.init_from == "" and cfg.diffusion.target == "v"
    assert c.config_for("teacher").run.steps == 30
    own = campaign({"stages": {"teacher": {}, "ft": {"from": "teacher", "overrides": ["init_from=/x@raw"]}}})
    assert own.config_for("ft").init_from == "/x@raw"  # the stage's own override wins over what from: derives


def test_heun_takes_the_most_steps_within_each_nfe():
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.config import DiffusionConfig

    path = build_diffusion(DiffusionConfig(path="rf")).path
    assert steps_for_nfe("euler", [1, 2, 4, 8], path) == [1, 2, 4, 8]
    assert steps_for_nfe("heun", [1, 2, 4, 8, 16], path) == [1, 2, 4, 8]  # NFE 1, 3, 7, 15 (Euler's last step)


# ----------------------------------------------------------------------------------- dry run
def _real_params(arch, acfg) -> int:
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    return sum(p.numel() for p in model.parameters())


def test_dry_run_of_the_digits_recipe_builds_every_stage_with_the_real_models():
    c = load_campaign(REPO / "configs/campaigns/digits.yaml")
    plans = {p.name: p for p in plan(c, world_size=2)}
    assert list(plans) == list(c.stages)
    cfg = c.config_for("teacher")
    arch, acfg = registry.arch_config(cfg.model, text_width("minilm")[0])
    real = _real_params(arch, acfg)
    for name, p in plans.items():
        if p.kind == "pairs":
            assert "4096 pairs of 'teacher'" in p.detail
            continue
        roles = {m.name: m.role for m in p.modules}
        if p.kind == "progressive":
            assert roles == {"student": "trainable", "teacher": "frozen", "text encoder": "frozen"}
            assert {m.name: m.params for m in p.modules}["teacher"] == real
        elif name == "cd":  # consistency distillation: the EMA target network is a derived copy of the student
            assert roles == {"student": "trainable", "teacher": "frozen", "target": "derived",
                             "text encoder": "frozen"}
        elif name == "ect":  # consistency training started from the teacher: no teacher, no target (iCT: mu = 0)
            assert roles == {"student": "trainable", "text encoder": "frozen"}
        elif p.kind == "dmd":  # two trainable networks against the frozen real score
            assert roles == {"generator": "trainable", "fake": "trainable", "teacher": "frozen",
                             "text encoder": "frozen"}
            assert p.modules[1].bytes_per_rank == 20 * real
        else:
            assert roles == {"backbone": "trainable", "text encoder": "frozen"}
        trained = p.modules[0]
        assert trained.role == "trainable" and trained.params == real and trained.per_rank == real  # ddp
        assert trained.bytes_per_rank == 20 * real
        assert "world 2 = pp 1 x dp_replicate 2 x dp_shard 1 (ddp)" in p.layout
    assert plans["teacher"].action == "train"


def test_dry_run_of_the_dit_xl_recipe_needs_no_file(tmp_path, monkeypatch, capsys):
    from difftrain.cli import main

    monkeypatch.chdir(REPO)
    main(["campaign", "configs/campaigns/dit_xl2_laion256.yaml", "--dry-run", "--nodes", "4"])
    out = capsys.readouterr().out
    c = load_campaign(REPO / "configs/campaigns/dit_xl2_laion256.yaml")
    assert not Path(c.config_for("teacher").encoders.text).exists()  # nothing of it is on this machine
    plans = {p.name: p for p in plan(c, nodes=4)}
    cfg = c.config_for("teacher")
    arch, acfg = registry.arch_config(cfg.model, 768)  # CLIP-L's width, from the table of known encoders
    n = sum(p.numel() for p in registry.build(arch, acfg).parameters())
    assert 5e8 < n < 7e8 and acfg.depth == 28 and acfg.hidden_size == 1152
    for name in ("teacher", "rf2", "rf2_1step"):
        (m, *_), = [[m for m in plans[name].modules if m.role == "trainable"]]
        assert (m.name, m.params, m.sharded, m.per_rank) == ("backbone", n, 32, math.ceil(n / 32))
    for name in ("pd16", "pd8", "pd4", "pd2", "pd1"):
        mods = {m.name: m for m in plans[name].modules}
        assert mods["student"].role == "trainable" and mods["teacher"].role == "frozen"
        assert mods["student"].params == mods["teacher"].params == n
        assert mods["teacher"].bytes_per_rank == 4 * math.ceil(n / 32)  # frozen: weights only, sharded
        assert plans[name].bytes_per_rank >= 24 * math.ceil(n / 32)
    assert "1048576 pairs of 'teacher'" in plans["pairs"].detail
    assert "world 32 = pp 1 x dp_replicate 1 x dp_shard 32 (fsdp2)" in plans["teacher"].layout
    for line in ("[pd1] progressive: would train", "└─ pd1 (progressive)", "└─ rf2_1step (reflow, data from pairs)",
                 "stage_args.teacher=runs/dit_xl2_laion256_campaign/pd2@ema"):
        assert line in out, line


def test_dry_run_shows_the_pipeline_segments(tmp_path):
    c = campaign({"overrides": ["parallel.pp=2", "parallel.engine=fsdp2", "model.args.depth=6"],
                  "stages": {"teacher": {}}}, tmp_path)
    p, = plan(c, world_size=4)
    (r0, segs0), (r1, segs1) = p.segments
    assert (r0, r1) == (0, 1) and segs0[0][:2] == (0, segs1[0][0]) and segs1[0][1] == 6
    m = p.modules[0]
    assert m.sharded == 2 and m.per_rank == math.ceil(max(segs0[0][2], segs1[0][2]) / 2)


# ---------------------------------------------------------------------------------- decisions
def _checkpoint(run_dir: Path, step: int, cfg, frozen: dict | None = None) -> None:
    """A real checkpoint folder of ``step`` holding ``cfg`` (the format the trainer writes; a stand-in tensor)."""
    state = {"step": step, "config": to_dict(cfg), "stage": cfg.stage, "served": "backbone",
             "frozen": frozen or {}, "config_hash": str(step)}
    ckpt.save(run_dir / "checkpoints", step, {"model": {"backbone": {"w": torch.full((2,), float(step))}}}, state,
              keep_last=0)


def _tree(tmp_path, pd_overrides=(), teacher_overrides=()):
    return {"dir": str(tmp_path / "c"), "config": "configs/demo.yaml",
            "stages": {"teacher": {"overrides": ["run.steps=4", *teacher_overrides]},
                       "pairs": {"kind": "pairs", "from": "teacher", "count": 16, "batch": 8, "shard_size": 8},
                       "pd": {"stage": "progressive", "from": "teacher", "stage_args": {"steps": 2},
                              "overrides": ["run.steps=4", "diffusion.target=v", *pd_overrides]}}}


def _finished_campaign(tmp_path):
    from difftrain.train.sources import Source

    c = parse_campaign(_tree(tmp_path), Path("test.yaml"))
    configs = {n: c.config_for(n) for n in c.training()}
    _checkpoint(c.run_dir("teacher"), 4, configs["teacher"])
    teacher = Source.parse("stage_args.teacher", f"{c.run_dir('teacher')}@ema").fingerprint()
    _checkpoint(c.run_dir("pd"), 4, configs["pd"], frozen={"teacher": teacher})
    write_record(c, "pd", configs["pd"])
    pairs = c.run_dir("pairs")
    pairs.mkdir(parents=True)
    (pairs / "encode_info.json").write_text(json.dumps({"pairs": {"count": 16}}))
    for k in range(2):
        (pairs / f"{k:05d}.tar").write_bytes(b"")
    write_record(c, "pairs", None)
    return c


def _decide(tmp_path, tree=None, **kw):
    c = parse_campaign(tree or _tree(tmp_path), Path("test.yaml"))
    return {d.name: d for d in decide(c, {n: c.config_for(n) for n in c.training()}, **kw)}


def _refusal(tmp_path, tree=None, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        _decide(tmp_path, tree, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_finished_stages_are_skipped_and_a_budget_change_resumes(tmp_path, world1):
    _finished_campaign(tmp_path)
    assert {n: d.action for n, d in _decide(tmp_path).items()} == {"teacher": "skip", "pairs": "skip", "pd": "skip"}
    d = _decide(tmp_path, _tree(tmp_path, pd_overrides=["run.steps=6"]))["pd"]
    assert d.action == "resume" and "interrupted at step 4 of 6" in d.why
    assert d.notes == ["budget change run.steps 4 -> 6"]


def test_a_changed_stage_is_refused_in_one_line_unless_rerun(tmp_path, world1):
    c = _finished_campaign(tmp_path)
    msg = _refusal(tmp_path, _tree(tmp_path, pd_overrides=["run.seed=1", "diffusion.weighting=truncated_snr"]))
    assert msg.startswith("campaign stage 'pd' has changed since it was trained (step 4): ")
    assert "run.seed 0 -> 1" in msg and "diffusion.weighting 'none' -> 'truncated_snr'" in msg
    assert "--rerun pd" in msg
    tree = _tree(tmp_path, pd_overrides=["run.seed=1"])
    assert _decide(tmp_path, tree, rerun=["pd"])["pd"].action == "rerun"
    # a pairs step whose request changed
    tree = _tree(tmp_path)
    tree["stages"]["pairs"]["count"] = 24
    msg = _refusal(tmp_path, tree)
    assert msg.startswith("campaign stage 'pairs' has changed since it wrote its pairs: count 16 -> 24")
    # moving aside keeps the old folder
    moved = move_aside(c.run_dir("pd"))
    assert moved.name == "pd.replaced-1" and not c.run_dir("pd").exists()
    c.run_dir("pd").mkdir()
    assert move_aside(c.run_dir("pd")).name == "pd.replaced-2"


def test_a_changed_teacher_refuses_its_students_until_they_are_rerun(tmp_path, world1):
    c = _finished_campaign(tmp_path)
    msg = _refusal(tmp_path, rerun=["teacher"])  # decided up front: nothing is moved or trained yet
    assert msg.startswith("campaign stage 'pairs' has changed")
    assert "'teacher', which it comes from, trains again" in msg
    msg = _refusal(tmp_path, rerun=["teacher", "pairs"])
    assert msg.startswith("campaign stage 'pd' has changed") and "--rerun pd" in msg
    got = _decide(tmp_path, rerun=["teacher", "pairs", "pd"])
    assert [d.action for d in got.values()] == ["rerun", "rerun", "rerun"]
    # the teacher trained on by itself (a newer checkpoint): the student's frozen teacher is another one
    _checkpoint(c.run_dir("teacher"), 5, c.config_for("teacher"))
    msg = _refusal(tmp_path)
    assert msg.startswith("campaign stage 'pairs' has changed") and "teacher was " in msg and "(step 5," in msg
    tree = _tree(tmp_path)
    del tree["stages"]["pairs"]
    msg = _refusal(tmp_path, tree)
    assert msg.startswith("campaign stage 'pd'") and "frozen module 'teacher' was" in msg and "(step 5," in msg


def test_only_needs_the_stages_it_comes_from_finished(tmp_path, world1):
    c = parse_campaign(_tree(tmp_path), Path("test.yaml"))
    _checkpoint(c.run_dir("teacher"), 2, c.config_for("teacher"))  # interrupted at 2 of 4
    msg = _refusal(tmp_path, only=["pd"])
    assert msg.startswith("campaign stage 'pd' needs 'teacher', which is not finished (interrupted at step 2 of 4)")
    got = _decide(tmp_path, only=["teacher"])
    assert {n: d.action for n, d in got.items()} == {"teacher": "resume", "pairs": "leave", "pd": "leave"}


def test_the_campaign_yaml_recipes_parse():
    for f in ("digits.yaml", "dit_xl2_laion256.yaml"):
        tree = yaml.safe_load((REPO / "configs/campaigns" / f).read_text())
        assert tree["stages"] and load_campaign(REPO / "configs/campaigns" / f).eval is not None
