import pytest

from difftrain.config import ConfigError, ParallelConfig, config_hash, parse_override, save_config
from difftrain.config_checks import load_config
from difftrain.parallelism.dims import ParallelDims
from tests.conftest import REPO

REPO_CONFIGS = REPO / "configs"


def test_demo_config_loads_with_overrides():
    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "run.dir=runs/x", "model.args.depth=2"])
    assert cfg.optim.lr == 3e-4 and cfg.run.dir == "runs/x" and cfg.model.args == {"depth": 2}
    assert cfg.model.cond == "text" and cfg.encoders.text == "minilm"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; valid keys in 'optim': lr, betas,"),
    ("parallel.engine=zero", "config key 'parallel.engine' = 'zero' is not one of: ddp, fsdp2"),
    ("optim.lr=fast", "config key 'optim.lr' must be float, got str 'fast'"),
    ("run.steps=1.5", "config key 'run.steps' must be int, got float 1.5"),
    ("nosection.x=1", "unknown config key 'nosection'; valid keys in '<root>': stage, stage_args, adapt, init_from, run,"),
    ("optim=3", "config section 'optim' must be a mapping"),
    ("eval.ref=", "config key 'eval.ref' must name held-out shards"),
    ("eval.sampler=ddpm", "config key 'eval.sampler' = 'ddpm' is not one of: '', euler, heun, ddim, dpmpp_2m"),
    ("eval.extractor=resnet:/w.pt", "config key 'eval.extractor' = 'resnet:/w.pt': the name before ':' must be one "
                                    "of digits, inception, clip"),
    # value ranges
    ("optim.lr=-1", "config key 'optim.lr' must be >= 0.0, got -1.0"),
    ("optim.lr=.nan", "config key 'optim.lr' must be a finite number, got nan"),
    ("run.log_every=0", "config key 'run.log_every' must be >= 1, got 0"),
    ("run.steps=-5", "config key 'run.steps' must be >= 1, got -5"),
    ("run.ckpt_every=-1", "config key 'run.ckpt_every' must be >= 0, got -1"),
    ("run.keep_last=-1", "config key 'run.keep_last' must be >= 0, got -1"),
    ("run.sample_num=0", "config key 'run.sample_num' must be >= 1, got 0"),
    ("run.timeout=-1", "config key 'run.timeout' must be >= 0, got -1.0"),
    ("run.seed=-1", "config key 'run.seed' must be >= 0, got -1"),
    ("data.max_skip_rate=0", "config key 'data.max_skip_rate' must be in (0.0, 1.0], got 0.0"),
    ("data.max_skip_rate=1.5", "config key 'data.max_skip_rate' must be in (0.0, 1.0], got 1.5"),
    ("data.num_workers=-1", "config key 'data.num_workers' must be >= 0, got -1"),
    ("data.batch_size=0", "config key 'data.batch_size' must be >= 1, got 0"),
    ("data.caption_dropout=1", "config key 'data.caption_dropout' must be in [0.0, 1.0), got 1.0"),
    ("data.streams=-2", "config key 'data.streams' must be >= 0, got -2"),
    ("data.buckets=[[16]]", "config key 'data.buckets': each bucket must be [height, width] in pixels"),
    ('data.filters={punsafe: "big"}', "config key 'data.filters.punsafe' must look like '>=5' or '<0.5'"),
    ("data.train={shards: a.tar}", "config key 'data.train': expected a shard pattern or a non-empty list"),
    ("optim.grad_accum=0", "config key 'optim.grad_accum' must be >= 1, got 0"),
    ("optim.ema_decay=1", "config key 'optim.ema_decay' must be in [0.0, 1.0), got 1.0"),
    ("optim.betas=[0.9, 1.0]", "config key 'optim.betas' must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("optim.betas=[0.9]", "config key 'optim.betas' must be two numbers in [0, 1)"),
    ("optim.min_lr_ratio=2", "config key 'optim.min_lr_ratio' must be in [0.0, 1.0], got 2.0"),
    ("optim.grad_clip=-1", "config key 'optim.grad_clip' must be >= 0.0, got -1.0"),
    ("optim.max_bad_steps=0", "config key 'optim.max_bad_steps' must be >= 1, got 0"),
    ("parallel.dp_shard=0", "config key 'parallel.dp_shard' must be >= 1 or -1 (inferred), got 0"),
    ("parallel.dp_replicate=-3", "config key 'parallel.dp_replicate' must be >= -1, got -3"),
    ("parallel.pp_bounds=[0, 2]", "config key 'parallel.pp_bounds' must be a list of block indices >= 1"),
    ("diffusion.t_max=1e-5", "config keys 'diffusion.t_min' = 0.0001 and 'diffusion.t_max' = 1e-05: t_min must be"),
    ("diffusion.assign_k=0", "config key 'diffusion.assign_k' must be >= 1, got 0"),
    ("model.image_size=0", "config key 'model.image_size' must be >= 1, got 0"),
    ("encoders.text_max_length=0", "config key 'encoders.text_max_length' must be >= 1, got 0"),
    ("eval.num=1", "config key 'eval.num' must be >= 2, got 1"),
    ("eval.steps=-1", "config key 'eval.steps' must be >= 0, got -1"),
    ("run.sample_prompts=[1, 2]", "config key 'run.sample_prompts' must be a list of strings"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_resolved_config_and_hash_are_saved(tmp_path):
    a = load_config("configs/demo.yaml")
    b = load_config("configs/demo.yaml", ["optim.lr=1e-3"])
    assert config_hash(a) != config_hash(b)
    h = save_config(b, tmp_path)
    assert h == config_hash(b)
    again = load_config(tmp_path / "config.yaml")
    assert config_hash(again) == h


@pytest.mark.parametrize("engine, rep, shard, world, expect", [
    ("ddp", -1, -1, 4, (4, 1)),
    ("fsdp2", -1, -1, 4, (1, 4)),
    ("fsdp2", 2, -1, 4, (2, 2)),
    ("fsdp2", -1, 2, 8, (4, 2)),
])
def test_parallel_dims_inference(engine, rep, shard, world, expect):
    d = ParallelDims.from_config(ParallelConfig(engine=engine, dp_replicate=rep, dp_shard=shard), world)
    assert (d.dp_replicate, d.dp_shard) == expect and d.dp == world


@pytest.mark.parametrize("kw, world, message", [
    (dict(engine="ddp", dp_shard=2), 4, "config key 'parallel.dp_shard' must be 1 with parallel.engine=ddp"),
    (dict(engine="fsdp2", dp_replicate=3, dp_shard=-1), 4, "cannot infer parallel.dp_shard"),
    (dict(engine="fsdp2", dp_replicate=2, dp_shard=3), 4, "parallel.dp_replicate*dp_shard*tp*pp = 2*3*1*1 = 6"),
    (dict(engine="fsdp2", tp=3), 4, "cannot infer parallel.dp_shard: the other dimensions (3) do not divide"),
])
def test_parallel_dims_errors(kw, world, message):
    with pytest.raises(ConfigError) as e:
        ParallelDims.from_config(ParallelConfig(**kw), world)
    assert str(e.value).startswith(message)


def test_parallel_dims_accept_pipeline():
    d = ParallelDims.from_config(ParallelConfig(engine="ddp", pp=2), 4)
    assert (d.pp, d.dp_replicate, d.dp) == (2, 2, 2)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "optim.grad_accum=2"], "config key 'optim.grad_accum' must be 1 with parallel.pp > 1"),
    (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_frozen=fill"],
     "config key 'parallel.pp_frozen' = fill works with pp_schedule gpipe or 1f1b"),
    (["parallel.pp=2", "parallel.pp_microbatches=0"], "config key 'parallel.pp_microbatches' must be >= 1"),
    (["parallel.pp_schedule=looped"], "config key 'parallel.pp_schedule'"),
])
def test_pipeline_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_CONFIGS).glob("*.yaml")))
def test_every_shipped_config_loads_and_builds_its_diffusion(name):
    from difftrain.diffusion.diffusion import build_diffusion

    cfg = load_config(REPO_CONFIGS / name)
    build_diffusion(cfg.diffusion)


# ---------------------------------------------------------------------------------- tags (resume guard)
def test_every_field_is_tagged_and_the_doc_table_agrees():
    import dataclasses

    from difftrain.config import TAGS, Config, leaf_fields

    def sections(cls):
        yield cls
        for f in dataclasses.fields(cls):
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                yield from sections(f.default_factory)

    code = {}
    for cls in sections(Config):  # every dataclass; its non-section fields must carry a tag
        for f in dataclasses.fields(cls):
            if not (isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)):
                assert f.metadata.get("tag") in TAGS, f"{cls.__name__}.{f.name} has no tag (identity/budget/execution)"
    for key, f in leaf_fields():
        code[key] = f.metadata["tag"]
    doc = {}
    for line in (REPO / "docs" / "RELIABILITY.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("section", "---"):
            continue
        prefix = "" if cells[0] == "(top level)" else cells[0] + "."
        for tag, names in zip(TAGS, cells[1:]):
            for name in names.split(","):
                if name.strip() not in ("—", ""):
                    doc[prefix + name.strip().strip("`")] = tag
    assert doc == code


def test_config_changes_are_tagged_and_compare_missing_keys_with_defaults():
    import json

    from difftrain.config import config_changes, to_dict

    base = load_config("configs/demo.yaml")
    saved = json.loads(json.dumps(to_dict(base)))
    assert config_changes(saved, base) == []
    cfg = load_config("configs/demo.yaml", ["diffusion.target=eps", "optim.lr=0.05", "run.log_every=5",
                                            "model.args.depth=2", "data.num_workers=0"])
    changes = {c.key: (c.tag, c.old, c.new) for c in config_changes(saved, cfg)}
    assert changes == {"diffusion.target": ("identity", "velocity", "eps"), "optim.lr": ("budget", 5e-4, 0.05),
                       "run.log_every": ("execution", 25, 5), "model.args": ("identity", {}, {"depth": 2}),
                       "data.num_workers": ("execution", 1, 0)}
    assert str(next(c for c in config_changes(saved, cfg) if c.key == "diffusion.target")) == \
        "diffusion.target 'velocity' -> 'eps'"
    del saved["run"]["allow_config_change"]  # a checkpoint from before the field existed: compared with its default
    saved["run"]["gone"] = 1  # a field that no longer exists: ignored
    assert config_changes(saved, base) == []
    allowed = load_config("configs/demo.yaml", ["run.allow_config_change=true"])
    assert [(c.key, c.old, c.new) for c in config_changes(saved, allowed)] == [("run.allow_config_change", False, True)]


def test_resume_configs_never_overwrite(tmp_path):
    from difftrain.config import save_resume_config

    first = load_config("configs/demo.yaml")
    save_config(first, tmp_path)
    before = (tmp_path / "config.yaml").read_bytes()
    a = save_resume_config(load_config("configs/demo.yaml", ["optim.lr=0.05"]), tmp_path, 10)
    b = save_resume_config(load_config("configs/demo.yaml", ["optim.lr=0.01"]), tmp_path, 10)
    assert (a.name, b.name) == ("config.resume-10.yaml", "config.resume-10.2.yaml")
    assert load_config(a).optim.lr == 0.05 and load_config(b).optim.lr == 0.01
    assert (tmp_path / "config.yaml").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.resume-10.2.yaml", "config.resume-10.yaml",
                                                           "config.yaml"]


# ----------------------------------------------------------------------------------- value ranges


def test_range_bounds_are_inclusive_where_documented():
    cfg = load_config("configs/demo.yaml", ["run.ckpt_every=0", "run.keep_last=0", "data.num_workers=0",
                                            "data.max_skip_rate=1", "optim.ema_decay=0", "parallel.dp_shard=-1",
                                            "optim.min_lr_ratio=1", "run.timeout=0"])
    assert (cfg.run.ckpt_every, cfg.data.max_skip_rate, cfg.optim.ema_decay) == (0, 1.0, 0.0)


# -------------------------------------------------------------------------------- override parsing
@pytest.mark.parametrize("override, value", [
    ("data.train=/a/{0..5}.tar", "/a/{0..5}.tar"),
    ("data.train={00000..00006}.tar", "{00000..00006}.tar"),
    ("data.train={0..5}", "{0..5}"),  # YAML alone reads a mapping {'0..5': None}
    ("data.train=/a/{x,{y,z}}.tar", "/a/{x,{y,z}}.tar"),
    ("data.train=[/a/{0..5}.tar, /b.tar]", ["/a/{0..5}.tar", "/b.tar"]),  # YAML alone raises
    ("data.train=[{shards: /a/{0..5}.tar, weight: 2}, /b/{a,b}.tar]",
     [{"shards": "/a/{0..5}.tar", "weight": 2}, "/b/{a,b}.tar"]),
    ("data.train=pipe:aws s3 cp s3://b/{000..099}.tar -", "pipe:aws s3 cp s3://b/{000..099}.tar -"),
    ("model.args={depth: 2, hidden_size: 64}", {"depth": 2, "hidden_size": 64}),
    ("data.buckets=[[16, 16], [8, 32]]", [[16, 16], [8, 32]]),
    ("eval.ref=", ""),
    ("optim.lr=3e-4", "3e-4"),  # a string to YAML 1.1; the float field converts it
])
def test_overrides_parse_brace_patterns_and_lists(override, value):
    assert parse_override(override)[1] == value


def test_a_brace_pattern_list_override_loads_as_that_list():
    cfg = load_config("configs/demo.yaml", ["data.train=[/a/{0..5}.tar, /b.tar]"])
    assert cfg.data.train == ["/a/{0..5}.tar", "/b.tar"]


@pytest.mark.parametrize("override, message", [
    ("data.train=[/a.tar, /b.tar", "config override 'data.train=[/a.tar, /b.tar' is not valid YAML ("),
    ("model.args={depth: 2", "config override 'model.args={depth: 2' is not valid YAML ("),
    ("run.dir=@home", "config override 'run.dir=@home' is not valid YAML ("),
    ("run.dir=!tag x", "config override 'run.dir=!tag x' is not valid YAML ("),
    ("model.args={depth:2}", "config override 'model.args={depth:2}': mapping key 'depth:2' has no value"),
])
def test_malformed_overrides_are_errors_not_strings(override, message):
    with pytest.raises(ConfigError) as e:
        parse_override(override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_malformed_config_file_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("run:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"^config file '.*bad.yaml' is not valid YAML at line 3, column 1: ") as e:
        load_config(f)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------- a training launch of N processes
def _launch(digits, *overrides, world=2):
    return load_config("configs/demo.yaml", [f"data.train={digits['train']}", f"eval.ref={digits['val']}",
                                             *overrides], world_size=world)


@pytest.mark.parametrize("overrides, world, message", [
    (["data.batch_size=7"], 2, "config key 'data.batch_size' = 7 must be a multiple of the data-parallel size 2 "
                               "(world size 2) x optim.grad_accum 1"),
    (["data.batch_size=8", "optim.grad_accum=3"], 2, "config key 'data.batch_size' = 8 must be a multiple of"),
    (["parallel.pp=2", "data.batch_size=6"], 4, "config key 'parallel.pp_microbatches' = 4 must divide the per-rank "
                                                "batch 3 (data.batch_size / the data-parallel size 2 (world size 4 / "
                                                "parallel.pp 2))"),
    (["parallel.pp=2", "data.batch_size=6"], 3, "cannot infer parallel.dp_replicate"),
    (["parallel.engine=fsdp2", "parallel.dp_replicate=3"], 4, "cannot infer parallel.dp_shard"),
    (["data.streams=3"], 2, "config key 'data.streams' = 3 must be a multiple of the data-parallel size 2"),
    (["data.buckets=[[16, 16], [8, 32]]", "data.streams=4"], 2, "config key 'data.buckets' needs one stream per rank"),
    (["model.args.nope=1"], 1, "unknown config key 'model.args.nope' for dit"),
    (["diffusion.density_args={m: 1, q: 2}"], 1, "config key 'diffusion.density_args' is invalid for density"),
    (["data.train=/nonexistent/{0..3}.tar"], 1, "config key 'data.train': none of its 4 shard(s) exist"),
    (["data.train="], 1, "config key 'data.train' must name the training shards"),
    (["eval.ref=/nonexistent/val.tar", "eval.every=10"], 1, "config key 'eval.ref': none of its 1 shard(s) exist"),
    (["init_from=/nonexistent"], 1, "config key 'init_from' = '/nonexistent' is not a folder"),
    (["encoders.text=/nonexistent"], 1, "config key 'encoders.text' = '/nonexistent' is neither a known alias"),
    (["encoders.vae=/nonexistent"], 1, "config key 'encoders.vae' = '/nonexistent' is not a folder with config.json"),
])
def test_launch_errors_before_any_process_group(digits, overrides, world, message):
    with pytest.raises(ConfigError) as e:
        _launch(digits, *overrides, world=world)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_launch_accepts_what_the_world_allows(digits, tmp_path):
    assert _launch(digits, "data.batch_size=8", world=2).data.batch_size == 8
    assert _launch(digits, "parallel.pp=2", "data.batch_size=16", world=4).parallel.pp == 2
    # the held-out set is read only when a validation falls within run.steps; a folder is a reference too
    _launch(digits, "eval.ref=/nonexistent/val.tar", "eval.every=2000", world=1)
    _launch(digits, f"eval.ref={tmp_path}", world=1)
    # without world_size (sample, export, eval, data stat read configs too): no layout or file checks
    load_config("configs/demo.yaml", ["data.batch_size=7", "data.train=/nonexistent/{0..3}.tar"])
