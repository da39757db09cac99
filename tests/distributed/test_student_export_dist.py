"""``difftrain export`` of real runs serves them at their own step count: the exported transformer and the
scheduler written beside it (difftrain/models/scheduler_export.py) reproduce ``sample_model_space`` of the run."""
from __future__ import annotations

import json
import sys

import diffusers
import pytest
import torch

from difftrain.models.scheduler_export import load_scheduler
from difftrain.sampling import sample_model_space
from tests.unit.test_student_export import B, CPU, NOISE_SEED, assert_close, class_call, diffusers_loop


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """One launch, two short runs of COMMON's class DiT on the digits (rf, velocity): pretrain served by Euler in 4
    steps, and consistency training (no teacher) served by the consistency sampler in 2 steps. EMA = the raw
    weights (decay 0) so that 4 steps move the zero-initialised output layer."""
    from tests.conftest import torchrun
    from tests.distributed.test_resume import COMMON

    out = tmp_path_factory.mktemp("student_export")
    base = " ".join(COMMON) + f" data.train={digits['train']} run.steps=4 optim.ema_decay=0 run.ckpt_every=0"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "weights"),
                 "pre", f"{base} run.sample_sampler=euler run.sample_steps=4 run.dir={out}/pre",
                 "ct", f"{base} stage=consistency stage_args.sample_steps=2 run.dir={out}/ct"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run,sampler,steps,scheduler", [("pre", "euler", 4, "FlowMatchEulerDiscreteScheduler"),
                                                         ("ct", "consistency", 2, "FlowMatchLCMScheduler")])
def test_export_serves_the_run_at_its_own_step_count(runs, tmp_path, run, sampler, steps, scheduler):
    from difftrain.eval.generator import load_generator
    from tests.conftest import run_cmd

    e = tmp_path / "export"
    p = run_cmd([sys.executable, "-m", "difftrain", "export", str(runs / run), "--out", str(e)])
    assert f"scheduler: diffusers {scheduler} ({sampler}, {steps} steps)" in p.stdout
    meta = json.loads((e / "difftrain.json").read_text())
    assert meta["sampling"]["sampler"] == sampler and meta["sampling"]["steps"] == steps
    assert meta["scheduler"] == {"class": scheduler, "subfolder": "scheduler", "num_inference_steps": steps}
    torch.set_num_threads(1)
    g = load_generator(runs / run, CPU)
    assert load_generator(e, CPU).sampling == g.sampling  # sample/eval of the export read the same sampling
    labels = torch.tensor([3, 6, 9])
    x = torch.randn(B, *(g.acfg.in_channels, g.acfg.image_size, g.acfg.image_size),
                    generator=torch.Generator().manual_seed(5))
    w = g.sampling.guidance
    noise = torch.Generator().manual_seed(NOISE_SEED)
    ours = sample_model_space(g.model, g.diffusion, g.conditioner, x, g.conditioner(None, labels), steps=steps,
                              sampler=sampler, guidance=w, noise=lambda i: torch.randn(x.shape, generator=noise))
    assert (ours - x).abs().max() > 1e-2  # the trained model moves the sample: the comparison is not trivial
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(e)).eval()
    got = diffusers_loop(transformer, load_scheduler(e), x, class_call(labels), steps, w, NOISE_SEED)
    assert_close(ours, got, f"{run}: {sampler} in {steps} steps via {scheduler}")
