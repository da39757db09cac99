"""The stage seam's config side: stage names come from the registry, ``stage_args`` is checked by the stage's own
dataclass, weight sources are checked without reading a tensor, and a stage that cannot be pipelined is refused
with parallel.pp > 1 -- each a one-line error naming the key."""
from __future__ import annotations

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.train.sources import Source
from difftrain.train.stages import STAGES, stage_args
from difftrain.train.stages.base import SamplingDefaults


def test_stage_choices_are_the_registry():
    with pytest.raises(ConfigError, match="config key 'stage' = 'nope' is not one of: pretrain, reflow, progressive, "
                                          "consistency, dmd, trajectory"):
        load_config(None, ["stage=nope"])
    assert set(STAGES) == {"pretrain", "reflow", "progressive", "consistency", "dmd", "trajectory"}


REFLOW = ["stage=reflow", "data.kind=latent", "data.require_caption=false", "diffusion.path=rf",
          "diffusion.target=velocity"]


@pytest.mark.parametrize("overrides, message", [
    (["stage_args.steps=2"], "config key 'stage_args' must be empty: stage 'pretrain' takes no arguments"),
    ([*REFLOW, "stage_args.lose=l2"],
     "unknown config key 'stage_args.lose' for stage 'reflow'; valid keys: loss, grid"),
    ([*REFLOW, "stage_args.loss=l1"],
     "config key 'stage_args.loss' = 'l1' is not one of: l2, pseudo_huber"),
    ([*REFLOW, "stage_args.grid=-1"],
     "config key 'stage_args.grid' must be >= 0, got -1"),
    (["stage=reflow", "diffusion.path=rf", "diffusion.target=velocity"], "config key 'data.kind' = 'image'"),
    (["stage=progressive", "diffusion.target=v"], "config key 'stage_args.teacher' is required by stage 'progressive'"),
    (["stage=progressive", "stage_args.teacher=x", "diffusion.target=eps"], "a progressive student predicts x, v or both"),
    (["stage=progressive", "stage_args.teacher=x", "diffusion.target=v", "parallel.pp=2", "diffusion.assign=linear"],
     "config key 'diffusion.assign' = 'linear' with parallel.pp > 1: the pipeline runs the teacher's step"),
    (["stage=consistency", "parallel.pp=2", "parallel.pp_schedule=zero_bubble"],
     "config key 'parallel.pp_schedule' = 'zero_bubble': stage 'consistency' carries its target network's forward"),
    (["stage=dmd", "stage_args.teacher=x", "parallel.pp=2"],
     "config key 'parallel.pp' = 2: stage 'dmd' cannot be pipelined: it trains two networks"),
])
def test_stage_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_stage_sampling_defaults():
    pre = load_config(None, ["run.sample_steps=7", "run.sample_sampler=heun", "run.sample_guidance=2.5"])
    assert STAGES["pretrain"].sampling(pre) == SamplingDefaults("heun", 7, 2.5)
    rf = load_config(None, [*REFLOW, "stage_args.grid=2", "run.sample_guidance=1.5"])
    assert stage_args(rf).grid == 2 and STAGES["reflow"].sampling(rf) == SamplingDefaults("euler", 2, 1.5)
    pd = load_config(None, ["stage=progressive", "stage_args.teacher=x", "stage_args.steps=4", "diffusion.target=v"])
    assert STAGES["progressive"].sampling(pd) == SamplingDefaults("ddim", 4, pd.run.sample_guidance)


def test_sources_are_checked_without_reading_a_tensor(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"config key 'stage_args.teacher' = '.*/run' is a run directory: say "
                                          r"which weights, '.*/run@ema' or '.*/run@raw'"):
        Source.parse("stage_args.teacher", str(run))
    with pytest.raises(ConfigError, match=r"after '@' say which weights, ema or raw"):
        Source.parse("init_from", f"{run}@best")
    with pytest.raises(ConfigError, match=r"config key 'init_from' = '.*/run@ema': run '.*/run' has no complete "
                                          r"checkpoint"):
        Source.parse("init_from", f"{run}@ema")
    with pytest.raises(ConfigError, match=r"config key 'stage_args.teacher' = '.*/nothing' is not a folder"):
        Source.parse("stage_args.teacher", str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"'.*/plain' is not a run directory \(no checkpoints/\)"):
        (tmp_path / "plain").mkdir()
        Source.parse("init_from", f"{tmp_path / 'plain'}@raw")


class _DeltaTeacher(torch.nn.Module):
    """The exact denoiser of a one-point data set per sample: the data are ``x`` (the batch's own x0), so the model's
    velocity-style v prediction is v = alpha eps - sigma x with eps = (x_t - alpha x) / sigma (diffusion.target v)."""

    def __init__(self, x: torch.Tensor, path):
        super().__init__()
        self.x, self.path = x, path

    def forward(self, x_t, t, cond):
        t = t.double()
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        a, s = self.path.alpha(t).reshape(shape), self.path.sigma(t).reshape(shape)
        x = self.x.repeat(len(x_t) // len(self.x), *([1] * (x_t.ndim - 1)))  # a CFG batch [2B]: both halves
        eps = (x_t.double() - a * x) / s
        return (a * eps - s * x).to(x_t.dtype)


@pytest.mark.parametrize("path", ["vp_cosine", "rf"])
def test_progressive_stage_targets_the_data_for_a_perfect_teacher(path, tmp_path):
    """REFERENCES E: with a perfect teacher the student's target x~ is the data point itself, through the stage's own
    wiring (keyed grid index, the teacher's two DDIM steps, the float64 target, the consistent eps~)."""
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models import registry
    from difftrain.train.build import Shared
    from difftrain.train.stages.progressive import ProgressiveStage

    folder = tmp_path / "teacher"
    arch, acfg = registry.arch_config(load_config(None, ["model.name=DiT-T/2", "model.args.depth=1"]).model, 0)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    registry.save_pretrained(model, model.state_dict(), folder)  # a real source folder (weights unused here)
    cfg = load_config(None, ["stage=progressive", f"stage_args.teacher={folder}", "stage_args.steps=4",
                             f"diffusion.path={path}", "diffusion.target=v", "run.seed=5"])
    cpu = torch.device("cpu")
    diffusion = build_diffusion(cfg.diffusion)
    stage = ProgressiveStage(Shared.parts(cfg, cpu, diffusion=diffusion), stage_args(cfg))
    x0 = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    stage.bind({"teacher": _DeltaTeacher(x0, diffusion.path)})
    prep = stage.prepare({"x0": x0.float(), "index": torch.arange(16), "cond": {}}, step=3)
    assert set(prep["t"].tolist()) <= {1.0, 0.75, 0.5, 0.25} and len(set(prep["t"].tolist())) > 1  # grid points
    torch.testing.assert_close(prep["x0"], x0.float(), atol=2e-5, rtol=0)
    # eps~ is the noise that, with x~, gives back x_t at t: the student's v target is consistent with x~
    torch.testing.assert_close(diffusion.add_noise(prep["x0"], prep["eps"], prep["t"]), prep["x_t"], atol=1e-5, rtol=0)


def test_guided_progressive_draws_w_per_sample_as_the_students_input(tmp_path):
    """Meng et al. 2023's first stage: w keyed per sample in guidance_range, the teacher's CFG scale and the
    student's ``guidance`` input; a config without guidance_embed is refused in one line."""
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models import registry
    from difftrain.models.conditioner import Conditioner
    from difftrain.train.build import Shared
    from difftrain.train.stages.progressive import ProgressiveStage

    folder = tmp_path / "teacher"
    arch, acfg = registry.arch_config(load_config(None, ["model.name=DiT-T/2", "model.args.depth=1"]).model, 0)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    registry.save_pretrained(model, model.state_dict(), folder)
    common = ["stage=progressive", f"stage_args.teacher={folder}", "diffusion.target=v", "model.cond=class",
              "model.num_classes=10", "stage_args.guidance_range=[1.0, 4.0]"]
    with pytest.raises(ConfigError, match="set model.args.guidance_embed=true"):
        load_config(None, common)
    with pytest.raises(ConfigError, match=r"'stage_args.guidance_range' = \[4.0, 1.0\]: two numbers"):
        load_config(None, [*common[:-1], "stage_args.guidance_range=[4.0, 1.0]", "model.args.guidance_embed=true"])
    cfg = load_config(None, [*common, "model.args.guidance_embed=true", "run.sample_guidance=2.5"])
    assert ProgressiveStage.sampling(cfg) == SamplingDefaults("ddim", 1, 2.5)  # w is the student's input
    cpu = torch.device("cpu")
    diffusion = build_diffusion(cfg.diffusion)
    cond = Conditioner(cfg.model, None, cpu, guidance_input=True)
    stage = ProgressiveStage(Shared.parts(cfg, cpu, diffusion=diffusion, conditioner=cond), stage_args(cfg))
    x0 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    stage.bind({"teacher": _DeltaTeacher(x0, diffusion.path)})
    batch = {"x0": x0.float(), "index": torch.arange(8), "cond": cond(None, torch.arange(8))}
    w = stage.prepare(batch, step=2)["cond"]["guidance"]
    assert w.shape == (8,) and bool(((w >= 1.0) & (w <= 4.0)).all()) and len(set(w.tolist())) == 8
    assert torch.equal(stage.prepare(batch, step=2)["cond"]["guidance"], w)  # keyed: the same again
    assert not torch.equal(stage.prepare(batch, step=3)["cond"]["guidance"], w)


def test_a_guidance_input_model_samples_with_w_as_input_in_one_forward():
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models.conditioner import Conditioner
    from difftrain.sampling import guided_x0

    cfg = load_config(None, ["model.cond=class", "model.num_classes=10"])
    calls = []

    def model(x, t, cond):
        calls.append({k: v.clone() for k, v in cond.items()})
        return torch.zeros_like(x)

    cond = Conditioner(cfg.model, None, torch.device("cpu"), guidance_input=True)
    c = cond(None, torch.arange(3))
    assert torch.equal(c["guidance"], torch.ones(3))  # unguided unless a sampler sets w
    fn = guided_x0(model, build_diffusion(cfg.diffusion), cond, c, 3.0, 3, torch.device("cpu"))
    fn(torch.zeros(3, 3, 4, 4), torch.full((3,), 0.5))
    assert len(calls) == 1 and len(calls[0]["class_labels"]) == 3  # no CFG batch of 2B
    assert torch.equal(calls[0]["guidance"], torch.full((3,), 3.0))
