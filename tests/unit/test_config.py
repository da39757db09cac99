import pytest

from difftrain.config import ConfigError, ParallelConfig, config_hash, load_config, save_config
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
    ("nosection.x=1", "unknown config key 'nosection'; valid keys in '<root>': stage, init_from, run,"),
    ("optim=3", "config section 'optim' must be a mapping"),
    ("eval.ref=", "config key 'eval.ref' must name held-out shards"),
    ("eval.sampler=ddpm", "config key 'eval.sampler' = 'ddpm' is not one of: euler, heun, ddim, dpmpp_2m"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert str(e.value).startswith(message)
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
    (dict(tp=2), 4, "config key 'parallel.tp' must be 1 for now"),
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
