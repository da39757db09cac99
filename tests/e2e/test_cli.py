"""Tier 3: the user's path through the real CLI and launcher on real tiny data.

data demo -> torchrun (2 gloo ranks) train -> sample -> export -> diffusers loads the export and
matches our model's output.
"""
import json
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cmd, torchrun
from tests.e2e.conftest import STEPS


def test_train_writes_run_dir(demo_run):
    run = demo_run / "run"
    text = (run / "config.yaml").read_text()
    assert text.startswith("# config hash ")
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000030", f"step_{STEPS:08d}"]
    assert (run / "samples" / f"step_{STEPS:08d}.png").is_file()


def test_loss_falls_and_tensorboard_has_scalars(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(demo_run / "run" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("loss", "grad_norm", "lr", "samples_per_s", "time/data", "time/fwd_bwd", "time/optim", "data/good"):
        assert tag in tags, tags
    assert acc.Scalars("data/good")[-1].value == 32 * (STEPS + 1)  # the look-ahead batch is counted too
    assert any(t.startswith("loss_by_t/") for t in tags)
    assert "samples/ema" in acc.Tags()["images"]
    losses = [e.value for e in acc.Scalars("loss")]
    assert len(losses) == STEPS // 10
    assert losses[-1] < 0.8 * losses[0], losses


def test_sample_writes_npz_and_grid(demo_run):
    out = demo_run / "samples"
    run_cmd([sys.executable, "-m", "difftrain", "sample", str(demo_run / "run"), "--num", "6", "--steps", "5",
             "--prompt", "a handwritten digit 7", "--out", str(out)])
    images = np.load(out / "samples.npz", allow_pickle=False)["images"]
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8
    assert images.std() > 0
    assert (out / "grid.png").is_file()


def test_export_loads_in_diffusers_and_matches(demo_run):
    from diffusers import PixArtTransformer2DModel

    from difftrain.models import registry
    from difftrain.train.build import read_model_config
    from difftrain.train.sources import load_run_weights

    out = demo_run / "export"
    run_cmd([sys.executable, "-m", "difftrain", "export", str(demo_run / "run"), "--out", str(out)])
    meta = json.loads((out / "difftrain.json").read_text())
    assert meta["diffusers_class"] == "PixArtTransformer2DModel" and meta["step"] == STEPS

    arch, acfg = read_model_config(demo_run / "run")
    ours = registry.materialize(registry.build(arch, acfg), "cpu", seed=3)
    load_run_weights(demo_run / "run", ours, which="ema")
    theirs = PixArtTransformer2DModel.from_pretrained(str(out)).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 16, 16, generator=g), torch.rand(3, generator=g)
    states, mask = torch.randn(3, 12, 384, generator=g), torch.ones(3, 12, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        a = ours(x, t, {"text_states": states, "text_mask": mask})
        b = theirs(x, encoder_hidden_states=states, timestep=t * 1000, encoder_attention_mask=mask.long()).sample
    assert (a - b).abs().max().item() <= 1e-5


def test_config_error_is_one_line_before_any_process_group(tmp_path):
    p = run_cmd([sys.executable, "-m", "difftrain", "train", "configs/demo.yaml", "optim.lrr=1",
                 f"run.dir={tmp_path}"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "difftrain: error: unknown config key 'optim.lrr'; valid keys in 'optim': lr, betas, weight_decay, eps, "
        "warmup_steps, schedule, min_lr_ratio, grad_clip, grad_accum, ema_decay, max_bad_steps, impl"]
    assert not any(tmp_path.iterdir())


def test_video_demo_trains_under_torchrun(tmp_path):
    """data demo --video -> configs/demo_video.yaml (factorized video DiT, PyAV decoding) on 2 gloo ranks."""
    pytest.importorskip("av")
    p = run_cmd([sys.executable, "-m", "difftrain", "data", "demo", "--video", "--out", str(tmp_path / "clips")])
    spec = json.loads(p.stdout)["train"]
    assert spec == str(tmp_path / "clips" / "train" / "{00000..00003}.tar")  # what configs/demo_video.yaml names
    run = tmp_path / "run"
    torchrun(2, ["-m", "difftrain", "train", "configs/demo_video.yaml", f"run.dir={run}", f"data.train={spec}",
                 "run.steps=4", "run.log_every=2", "run.ckpt_every=0", "run.sample_every=4", "run.sample_num=2",
                 "run.sample_steps=2", "data.batch_size=8"])
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (run / "samples" / "step_00000004.png").is_file()
