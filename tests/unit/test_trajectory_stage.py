"""Stage ``trajectory`` (EfficientDM's data-free distillation, He et al. 2023, arXiv:2310.03270, sec. 3.3): each
sample's point is what our sampler gives from the same keyed noise in i steps, and the target is the teacher's raw
output there; a student equal to its teacher has loss 0 exactly, a quantised one does not and training lowers it;
the batches are keyed; config errors are one line; and a real run with ``optim.lr=0`` (the PTQ baseline) changes
nothing but the activation quantisers' calibration buffers."""
from __future__ import annotations

import copy

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.diffusion.keyed import keyed_randn
from difftrain.diffusion.samplers import SAMPLERS, time_grid
from difftrain.finetune.adapt import apply_changes, changes_of
from difftrain.models import registry
from difftrain.train.stages.base import SamplingDefaults

CPU = torch.device("cpu")
MODEL = ["model.name=DiT-T/2", "model.args.depth=1", "model.args.hidden_size=32", "model.args.num_heads=2",
         "model.image_size=8", "model.in_channels=3", "model.cond=class", "model.num_classes=10",
         "diffusion.target=v", "run.seed=3"]
QAT = "adapt=[{kind: qat, weight_bits: 4, act_bits: 8, t_intervals: 4}]"


def _teacher_folder(tmp_path):
    """A real teacher folder with non-trivial weights (a fresh DiT's zero-initialised output layer predicts 0)."""
    folder = tmp_path / "teacher"
    arch, acfg = registry.arch_config(load_config(None, MODEL).model, 0)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    registry.save_pretrained(model, model.state_dict(), folder)
    return folder, model.eval()


def _stage(tmp_path, *overrides):
    """(stage, its config, the teacher module) for ``stage=trajectory`` with a real teacher folder, on the CPU."""
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models.conditioner import Conditioner
    from difftrain.train.build import Shared
    from difftrain.train.stages import STAGES, stage_args

    folder, teacher = _teacher_folder(tmp_path)
    cfg = load_config(None, [*MODEL, "stage=trajectory", f"stage_args.teacher={folder}", *overrides])
    arch, acfg = registry.arch_config(cfg.model, 0)
    shared = Shared.parts(cfg, CPU, diffusion=build_diffusion(cfg.diffusion),
                          conditioner=Conditioner(cfg.model, None, CPU), arch=arch, acfg=acfg)
    return STAGES["trajectory"](shared, stage_args(cfg)), cfg, teacher


def _batch(n=8, start=0):
    idx = torch.arange(start, start + n)
    return {"index": idx, "labels": idx % 10}


@pytest.mark.parametrize("sampler,guidance", [("ddim", 1.0), ("heun", 1.0), ("dpmpp_2m", 2.0), ("euler", 1.0)])
def test_points_are_our_sampler_run_by_hand_for_i_steps(tmp_path, sampler, guidance):
    from difftrain.sampling import guided_x0

    stage, cfg, teacher = _stage(tmp_path, "stage_args.steps=5", f"stage_args.sampler={sampler}",
                                 f"stage_args.teacher_guidance={guidance}")
    stage.bind({"teacher": teacher})
    batch, step = _batch(8), 7
    fb = stage.frozen(batch, step)
    prep = stage.prepare(fb, step)
    i = stage.draw_index(batch, step)
    assert len(set(i.tolist())) > 2 and int(i.max()) < 5
    x_T = keyed_randn(cfg.run.seed, step, batch["index"], (3, 8, 8), "noise")
    assert torch.equal(fb["x0"], x_T)  # data-free: the frozen batch holds the keyed start, no image
    ts, cond = time_grid(5, 1.0, 0.0), fb["cond"]
    for j in range(8):
        one = {k: v[j:j + 1] for k, v in cond.items()}
        fn = guided_x0(teacher, stage.diffusion, stage.conditioner, one, guidance, 1, CPU)
        k = int(i[j])
        want = x_T[j:j + 1] if k == 0 else SAMPLERS[sampler](fn, x_T[j:j + 1], ts[:k + 1], path=stage.diffusion.path)
        torch.testing.assert_close(prep["x_t"][j:j + 1], want, rtol=0, atol=2e-5)
        t = ts[k].float().reshape(1)
        with torch.no_grad():  # the target: the teacher's raw output there (guided: uncond + w (cond - uncond))
            raw = teacher(want, t, one)
            if guidance != 1.0:
                raw = torch.lerp(teacher(want, t, stage.conditioner.null(1)), raw, guidance)
        torch.testing.assert_close(prep["target"][j:j + 1], raw, rtol=0, atol=2e-5)
        assert float(prep["t"][j]) == float(ts[k].float())  # the grid time, as the teacher saw it


def test_an_identical_student_has_loss_zero_and_a_quantised_one_learns(tmp_path):
    stage, cfg, teacher = _stage(tmp_path, "stage_args.steps=4", QAT)
    same = copy.deepcopy(teacher)
    stage.bind({"teacher": teacher, "student": same})
    prep = stage.prepare(stage.frozen(_batch(8), 0), 0)
    with torch.no_grad():
        loss, per = stage.loss(stage.forward(prep), prep)
    assert float(loss) == 0.0 and torch.equal(per, torch.zeros(8))

    student = apply_changes(copy.deepcopy(teacher), changes_of(cfg), seed=0).train()
    stage.bind({"teacher": teacher, "student": student})
    held = stage.prepare(stage.frozen(_batch(16, start=1000), 0), 0)  # held-out samples, also the calibration pass

    def held_loss():
        with torch.no_grad():
            return float(stage.loss(stage.forward(held), held)[0])

    before = held_loss()
    assert before > 0
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    for step in range(1, 21):
        prep = stage.prepare(stage.frozen(_batch(8), step), step)
        loss, _ = stage.loss(stage.forward(prep), prep)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.5 * before, (held_loss(), before)  # measured: 0.19x


def test_batches_are_keyed_and_sample_indices_differ(tmp_path):
    stage_a, _, teacher = _stage(tmp_path / "a", "stage_args.steps=6")
    stage_b, _, _ = _stage(tmp_path / "b", "stage_args.steps=6")
    stage_a.bind({"teacher": teacher})
    stage_b.bind({"teacher": copy.deepcopy(teacher)})
    a = stage_a.prepare(stage_a.frozen(_batch(12), 5), 5)
    b = stage_b.prepare(stage_b.frozen(_batch(12), 5), 5)
    for k in ("x_t", "t", "target"):
        assert torch.equal(a[k], b[k]), k
    assert len(set(a["t"].tolist())) > 2  # different samples, different grid indices
    c = stage_a.prepare(stage_a.frozen(_batch(12), 6), 6)
    assert not torch.equal(a["t"], c["t"]) and not torch.equal(a["x_t"], c["x_t"])  # keyed by the step too


def test_sampling_follows_the_teacher_unless_set(tmp_path):
    """The teacher's own sampler and N (a model folder without saved sampling samples with dpmpp_2m in 25 steps,
    ``Source.sampling``; a real run's saved sampling: test_ptq_baseline_...), ``stage_args`` where set, the run's
    ``run.sample_*`` for a teacher that cannot be read, and ddim in place of a stochastic sampler."""
    from difftrain.train.stages import STAGES

    folder, _ = _teacher_folder(tmp_path)
    run = [*MODEL, "stage=trajectory", "run.sample_sampler=heun", "run.sample_steps=6", "run.sample_guidance=1.0"]
    sampling = STAGES["trajectory"].sampling
    assert sampling(load_config(None, [*run, f"stage_args.teacher={folder}"])) == SamplingDefaults("dpmpp_2m", 25, 1.0)
    assert sampling(load_config(None, [*run, f"stage_args.teacher={folder}", "stage_args.sampler=euler",
                                       "stage_args.steps=3"])) == SamplingDefaults("euler", 3, 1.0)
    unread = [*run, f"stage_args.teacher={tmp_path / 'gone'}"]
    assert sampling(load_config(None, unread)) == SamplingDefaults("heun", 6, 1.0)
    assert sampling(load_config(None, [*unread, "run.sample_sampler=lcm"])) == SamplingDefaults("ddim", 6, 1.0)


@pytest.mark.parametrize("overrides, message", [
    ([], "config key 'stage_args.teacher' is required by stage 'trajectory'"),
    (["stage_args.teacher=x", "stage_args.sampler=lcm"], "config key 'stage_args.sampler' = 'lcm' is not one of"),
    (["stage_args.teacher=x", "diffusion.weighting=min_snr"], "config key 'diffusion.weighting' = 'min_snr'"),
    (["stage_args.teacher=x", "diffusion.assign=linear"], "config key 'diffusion.assign' = 'linear'"),
    (["stage_args.teacher=x", "stage_args.guidance_range=[1, 2]"], "unknown config key 'stage_args.guidance_range'"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*MODEL, "stage=trajectory", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ real runs
RUN = [*MODEL[:-1], "model.image_size=16", "model.in_channels=1", "data.channels=1", "data.image_size=16",
       "run.seed=3", "run.log_every=1", "run.progress=false", "run.sample_every=0", "run.ckpt_every=1000",
       "run.sample_sampler=ddim", "run.sample_steps=4", "run.sample_guidance=1.0", "data.batch_size=8",
       "data.num_workers=0", "data.shuffle_buffer=16", "optim.warmup_steps=0", "optim.schedule=constant",
       "eval.every=0", "encoders.text="]


def _train(digits, run_dir, *overrides):
    """A real in-process training run; returns its Trainer."""
    from difftrain.launch.env import shutdown
    from difftrain.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(load_config(None, [*RUN, f"data.train={digits['train']}", f"run.dir={run_dir}", *overrides]))
        trainer.fit()
        return trainer
    finally:
        signals = getattr(trainer, "signals", None)
        if signals is not None:
            signals.restore()
        shutdown()


@pytest.fixture(scope="module")
def teacher_run(digits, tmp_path_factory):
    """A short pre-training run of the tiny class-conditional DiT on the digits (v prediction, DDIM 4 steps)."""
    run_dir = tmp_path_factory.mktemp("trajectory") / "teacher"
    _train(digits, run_dir, "run.steps=4", "optim.lr=1e-3")
    return run_dir


def test_a_teacher_with_another_target_is_refused(teacher_run, digits, tmp_path):
    with pytest.raises(ConfigError) as e:
        _train(digits, tmp_path / "student", "run.steps=1", "stage=trajectory", f"stage_args.teacher={teacher_run}@ema",
               "diffusion.target=eps")
    assert "config key 'diffusion.target' = 'eps', but the teacher" in str(e.value) and "\n" not in str(e.value)


def test_ptq_baseline_lr_0_changes_only_the_calibration_buffers(teacher_run, digits, tmp_path):
    """``stage=trajectory`` with a W4A8 timestep-aware qat student and ``optim.lr=0``: every weight, every weight
    step size and every activation log step size is the teacher's / the fresh quantiser's; only the activation
    quantisers' calibration buffers moved, over several t-intervals."""
    from difftrain.train.sources import Source

    trainer = _train(digits, tmp_path / "ptq", "run.steps=3", "optim.lr=0", "stage=trajectory", QAT,
                     f"stage_args.teacher={teacher_run}@ema")
    assert trainer.sampling() == SamplingDefaults("ddim", 4, 1.0)  # the teacher's own sampling
    got = {k.removeprefix("module."): v.detach().clone()
           for k, v in trainer.engine.models["student"].state_dict().items()}
    arch, acfg = registry.arch_config(trainer.cfg.model, 0)
    teacher = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    Source.parse("t", f"{teacher_run}@ema").load(teacher)
    fresh = apply_changes(teacher, changes_of(trainer.cfg), seed=0).state_dict()
    assert got.keys() == fresh.keys()
    calib = ("act_quant.step0", "act_quant.zero0", "act_quant.stat", "act_quant.calibrated")
    moved = [k for k in got if not torch.equal(got[k], fresh[k])]
    assert moved and all(k.endswith(calib) for k in moved), [k for k in moved if not k.endswith(calib)]
    assert all(int(v) >= 1 for k, v in got.items() if k.endswith("act_quant.calibrated"))
    stats = [v for k, v in got.items() if k.endswith("act_quant.stat")]
    assert sum(int((s > 0).all(-1).sum()) for s in stats) > len(stats)  # more than one t-interval calibrated
