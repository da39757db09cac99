"""LoRA under the real launcher (config key ``adapt``): a base model trained briefly, then LoRA fine-tuning from it
(``init_from``) on one process, on 2 ranks with DDP and FSDP2 (frozen base and trainable adapters in the same
sharded blocks) and pipelined (pp = 2): all end with the same adapters, the base weights untouched, no optimizer
state or EMA for the base; a LoRA consistency-distillation student (LCM-LoRA: consistency + lora, its target
network a LoRA'd copy) on 2 FSDP2 ranks equals one process; a run resumed mid-way ends where an uninterrupted one
does; checkpoints hold the adapters only (the base is recorded by fingerprint, and a changed base is refused);
``difftrain sample`` and ``export`` serve the merged model."""
from __future__ import annotations

import sys

import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difftrain.finetune.adapt import changes_of
from difftrain.models import registry
from difftrain.train.build import read_model_config
from difftrain.train.sources import load_run_weights

from tests.conftest import run_cmd, torchrun
from tests.distributed.test_consistency_dist import CD, assert_close
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import checkpoint, part

# JSON (valid YAML without spaces: train_job splits the overrides on whitespace)
LORA = ('adapt=[{"kind":"lora","rank":4,"alpha":8,"targets":["attn","mlp","modulation"]}] optim.lr=1e-2 '
        'run.steps=5')
PP = "parallel.pp=2 parallel.pp_microbatches=2"
DIFFFIT = 'adapt=[{"kind":"difffit"}] optim.lr=1e-2 run.steps=5'  # tests at the end of this file


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    base = f"{SMALL} data.train={digits['train']}"
    lora = f"{base} {LORA} init_from={out}/base@ema"
    lcm = f'{base} {CD} stage_args.teacher={out}/base@ema adapt=[{{"kind":"lora","rank":4}}]'
    difffit = f"{base} {DIFFFIT} init_from={out}/base@ema"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "base", f"{base} run.steps=6 run.dir={out}/base",
                 "lora", f"{lora} run.dir={out}/lora_single",
                 "lcm", f"{lcm} run.dir={out}/lcm_single",
                 "difffit", f"{difffit} run.dir={out}/difffit_single",
                 # a LoRA over base2, then base2 trains on: the adapters' base is gone
                 "base2", f"{base} run.steps=2 run.dir={out}/base2",
                 "lora2", f"{base} {LORA} run.steps=2 init_from={out}/base2@ema run.dir={out}/lora2",
                 "base2_more", f"{base} run.steps=4 run.dir={out}/base2"])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "lora_ddp", f"{lora} run.dir={out}/lora_ddp",
                 "lora_fsdp2", f"{lora} parallel.engine=fsdp2 run.dir={out}/lora_fsdp2",
                 "lora_pp", f"{lora} {PP} run.dir={out}/lora_pp",
                 "lcm_fsdp2", f"{lcm} parallel.engine=fsdp2 run.dir={out}/lcm_fsdp2",
                 "difffit_ddp", f"{difffit} run.dir={out}/difffit_ddp",
                 "difffit_fsdp2", f"{difffit} parallel.engine=fsdp2 run.dir={out}/difffit_fsdp2",
                 "difffit_pp", f"{difffit} {PP} run.dir={out}/difffit_pp",
                 # 3 steps, then resumed to 5: adapters, their optimizer state and EMA come back exactly
                 "resume_a", f"{lora} parallel.engine=fsdp2 run.steps=3 run.dir={out}/lora_resumed",
                 "resume_b", f"{lora} parallel.engine=fsdp2 run.dir={out}/lora_resumed"])
    return out


@pytest.mark.parametrize("run", ["lora_ddp", "lora_fsdp2", "lora_pp", "lora_resumed"])
def test_lora_on_two_ranks_equals_one_process_and_trains_only_the_adapters(runs, run):
    (one, s1), (two, s2) = checkpoint(runs / "lora_single"), checkpoint(runs / run)
    (base, _) = checkpoint(runs / "base")
    assert s1["step"] == s2["step"] == 5
    model1, model2 = part(one, "model.backbone."), part(two, "model.backbone.")
    adapters = {k for k in model1 if ".lora_" in k}
    # adapter-only checkpoints: the model's saved tensors are the adapters (the base is read from init_from)
    assert adapters and set(model1) == set(model2) == adapters
    assert_close(model1, model2, f"{run} model")
    assert_close(part(one, "ema.backbone."), part(two, "ema.backbone."), f"{run} EMA")
    # only the adapters train: they are the EMA's and the optimizer's only parameters
    assert set(part(two, "ema.backbone.")) == adapters
    assert {k.split(".state.")[0] for k in part(two, "optim.") if ".state." in k} <= {f"backbone.{k}" for k in adapters}
    assert s2["base"]["backbone"]["source"] == f"{runs}/base@ema"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in model2.items() if ".lora_B." in k)


def test_the_base_stays_the_inits_and_checkpoints_are_a_fraction_of_its_size(runs):
    """The trained model (base + adapters, as the trainer held it at the end) has the base run's EMA weights as its
    frozen base; a LoRA checkpoint (adapters, their AdamW moments and EMA) is a fraction of the base run's."""
    trained, ema_base = load_file(runs / "single" / "lora.safetensors"), part(checkpoint(runs / "base")[0], "ema.backbone.")
    frozen = {k: v for k, v in trained.items() if ".lora_" not in k}
    assert len(frozen) == len(ema_base)
    for k, v in frozen.items():
        assert torch.equal(v, ema_base[k.replace(".base_layer.", ".")]), f"base weight {k} moved"

    def size(run: Path) -> int:
        d = max((run / "checkpoints").glob("step_*"))
        return sum(f.stat().st_size for f in d.iterdir() if f.name.endswith(".distcp"))

    ratio = size(runs / "lora_single") / size(runs / "base")
    print(f"LoRA checkpoint / base checkpoint bytes: {ratio:.3f}")
    assert ratio < 0.5


def test_adapters_whose_base_changed_are_refused(runs, tmp_path):
    """``lora2``'s base run trained on after it: serving it (its adapters fit no other base) is refused in one line
    naming the base and both fingerprints."""
    p = subprocess.run([sys.executable, "-m", "difftrain", "sample", str(runs / "lora2"), "--num", "2", "--steps", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode != 0
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("difftrain: error: ") and f"the frozen base of 'backbone' was {runs}/base2@ema (step 2" in line
    assert "now step 4" in line, line


def test_lcm_lora_student_on_two_fsdp2_ranks_equals_one_process(runs):
    """consistency + lora: the student's adapters train, its target network is a LoRA'd copy that follows them."""
    (one, s1), (two, _) = checkpoint(runs / "lcm_single"), checkpoint(runs / "lcm_fsdp2")
    assert s1["modules"] == {"student": "trainable", "teacher": "frozen", "target": "derived"}
    target = part(one, "derived.target.")
    assert target and all(".lora_" in k for k in target)  # the target's base is the student's, not saved
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in target.items())  # the target followed
    for prefix in ("model.student.", "ema.student.", "derived.target."):
        assert_close(part(one, prefix), part(two, prefix), f"lcm {prefix}")


def test_sample_and_export_serve_the_merged_lora_model(runs, tmp_path):
    """``difftrain sample`` on a LoRA run: the plain architecture with the adapters merged; different from the base
    run's samples (the adapters trained), the same on a rerun and from its export (a plain model folder)."""
    run_cmd([sys.executable, "-m", "difftrain", "export", str(runs / "lora_single"), "--out", str(tmp_path / "e")])
    outs = {}
    for name, src in (("lora", runs / "lora_single"), ("export", tmp_path / "e"), ("base", runs / "base")):
        run_cmd([sys.executable, "-m", "difftrain", "sample", str(src), "--num", "4", "--steps", "2",
                 "--out", str(tmp_path / name)])
        outs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(outs["lora"], outs["export"])
    assert not np.array_equal(outs["lora"], outs["base"])


# DiffFit (finetune/difffit.py) in the same launches: frozen weights beside trainable biases and scale factors γ in the
# same sharded blocks; a run read for serving is the merged EMA model
@pytest.mark.parametrize("run", ["difffit_ddp", "difffit_fsdp2", "difffit_pp"])
def test_difffit_on_two_ranks_equals_one_process_and_tunes_only_its_parameters(runs, run):
    (one, s1), (two, s2) = checkpoint(runs / "difffit_single"), checkpoint(runs / run)
    assert s1["step"] == s2["step"] == 5
    for prefix in ("model.backbone.", "ema.backbone."):
        assert_close(part(one, prefix), part(two, prefix), f"{run} {prefix}")
    change = changes_of(SimpleNamespace(adapt=[{"kind": "difffit"}]))[0]
    tuned = set(part(two, "ema.backbone."))  # the EMA covers exactly what trains
    assert tuned and all(change.owns(k) for k in tuned)
    assert {k for k in tuned if k.endswith(".difffit_gamma")} == {"blocks.0.attn.difffit_gamma",
                                                                  "blocks.0.mlp.difffit_gamma"}  # first half of 2
    assert "y_embed.weight" in tuned and "blocks.1.mlp.fc2.bias" in tuned and "blocks.0.attn.qkv.weight" not in tuned
    assert {k.split(".state.")[0] for k in part(two, "optim.") if ".state." in k} <= {f"backbone.{k}" for k in tuned}
    gamma = part(two, "model.backbone.")["blocks.0.attn.difffit_gamma"]
    assert not torch.equal(gamma, torch.ones_like(gamma))  # γ moved from its init


def test_a_run_read_for_serving_is_the_merged_ema_model(runs):
    """``load_run_weights`` overlays the EMA on the biases and γ (not the live weights) and merges: the plain
    architecture whose output equals the unmerged model's."""
    run = runs / "difffit_fsdp2"
    arch, acfg = read_model_config(run)
    merged, unmerged = (registry.materialize(registry.build(arch, acfg), "cpu", seed=1) for _ in range(2))
    plain_keys = set(merged.state_dict())
    assert load_run_weights(run, merged) == load_run_weights(run, unmerged, merge=False) == 5
    assert set(merged.state_dict()) == plain_keys
    tensors, _ = checkpoint(run)
    ema, live = part(tensors, "ema.backbone."), part(tensors, "model.backbone.")
    params = dict(unmerged.named_parameters())
    bias = "blocks.1.attn.qkv.bias"  # a bias outside the scaled blocks: served as its EMA
    assert torch.equal(params[bias], ema[bias]) and not torch.equal(ema[bias], live[bias])
    assert torch.equal(merged.state_dict()[bias], ema[bias])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, acfg.in_channels, acfg.image_size, acfg.image_size, generator=g)
    inputs = (x, torch.rand(2, generator=g), {"class_labels": torch.tensor([3, 10])})  # 10: the null label
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs), unmerged(*inputs), rtol=1e-5, atol=5e-6)
