"""Tier 2: DDP and FSDP2 on 2 gloo ranks (and HSDP on 4) equal a single process on the same global
batch (5 steps, DiT text-conditional with the real MiniLM, UNet class-conditional). Tensor parallelism on 4 ranks
(parallel/tensor_parallel.py): FSDP2 dp 2 x tp 2 on the text DiT (cross-attention) and tp 4 on a class DiT
(adaLN-Zero), megatron-core's implementation of the same split and sequence parallelism equal one process; a one-process checkpoint
resumes under dp 2 x tp 2, and a TP run's checkpoint (its EMA) reads back into one process.

Adam's eps is 1e-6 here: its first steps divide by |g| + eps, so with eps = 1e-8 float rounding in
near-zero gradients (a different summation order) becomes ~1e-5 weight noise, which would test
Adam's conditioning rather than the engines."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from difftrain.models import registry
from difftrain.train.build import read_model_config
from difftrain.train.sources import load_run_weights
from tests.conftest import torchrun

COMMON = "run.steps=5 run.log_every=1 run.ckpt_every=0 run.progress=false data.batch_size=8 " \
         "data.num_workers=0 data.channels=1 data.image_size=16 model.image_size=16 model.in_channels=1 " \
         "optim.lr=1e-3 optim.eps=1e-6 optim.warmup_steps=2 data.caption_dropout=0.3 data.streams=4"
MODELS = {
    "dit": "model.name=DiT-T/2 model.cond=text encoders.text=minilm encoders.text_max_length=8 "
           "model.args.depth=2 model.args.hidden_size=64 model.args.num_heads=4",
    "unet": "model.name=UNet-T model.cond=class model.num_classes=10",
}

DIT_CLASS = "model.name=DiT-T/2 model.cond=class model.num_classes=10 model.args.depth=2 model.args.hidden_size=64 " \
            "model.args.num_heads=4"
TP = "parallel.engine=fsdp2 parallel.tp=2"
MEGATRON = "parallel.tp_impl=megatron"

# immiscible noise across the dp ranks, a Laplace density and min-SNR weighting; and the KNN assigner
IMMISCIBLE = ("diffusion.assign=linear diffusion.assign_scope=global diffusion.density=laplace "
              "diffusion.weighting=min_snr")
KNN = "diffusion.assign=knn diffusion.assign_k=3"


@pytest.fixture(scope="module")
def results(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv")

    def cases(launch, engines):
        args = []
        for m, margs in MODELS.items():
            for e in engines:
                args += [f"{m}_{e}", f"{COMMON} {margs} data.train={digits['train']} "
                                     f"parallel.engine={e} run.dir={out}/{launch}_{m}_{e}"]
        return args

    unet = f"{COMMON} {MODELS['unet']} data.train={digits['train']}"
    dit = f"{COMMON} {MODELS['dit']} data.train={digits['train']}"
    dit_class = f"{COMMON} {DIT_CLASS} data.train={digits['train']}"
    sampling = "run.sample_every=5 run.sample_num=4 run.sample_steps=3"  # EMA sample grid on every rank
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"), *cases("single", ["ddp"]),
                 "dit_class", f"{dit_class} run.dir={out}/single_dit_class",
                 "dit_grid", f"{dit} {sampling} run.ckpt_every=2 run.keep_last=5 run.dir={out}/single_dit_grid",
                 "unet_bf16", f"{unet} parallel.mixed_precision=bf16 run.dir={out}/single_unet_bf16",
                 "unet_imm", f"{unet} {IMMISCIBLE} run.dir={out}/single_unet_imm",
                 "unet_knn", f"{unet} {KNN} run.dir={out}/single_unet_knn"])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"), *[f"{a} {sampling}" if i % 2 else a
                                                                for i, a in enumerate(cases("two", ["ddp", "fsdp2"]))],
                 "unet_ddp_accum2", f"{unet} optim.grad_accum=2 run.dir={out}/two_unet_accum2",
                 "unet_fsdp2_accum2", f"{unet} optim.grad_accum=2 parallel.engine=fsdp2 run.dir={out}/two_unet_f_accum2",
                 "unet_imm", f"{unet} {IMMISCIBLE} parallel.engine=fsdp2 run.dir={out}/two_unet_imm",
                 "unet_knn", f"{unet} {KNN} run.dir={out}/two_unet_knn"])
    # the one-process run's step-2 checkpoint, resumed below under dp 2 x tp 2
    shutil.copytree(out / "single_dit_grid", out / "tp_resumed")
    for later in (out / "tp_resumed" / "checkpoints").glob("step_*"):
        if later.name != "step_00000002":
            shutil.rmtree(later)
    torchrun(4, ["tests/distributed/train_job.py", str(out / "four"), "unet_hsdp",
                 f"{unet} parallel.engine=fsdp2 parallel.dp_replicate=2 parallel.dp_shard=2 "
                 f"run.dir={out}/four_unet_hsdp",
                 "dit_dp2tp2", f"{dit} {TP} parallel.dp_shard=2 {sampling} run.dir={out}/four_dit_dp2tp2",
                 "dit_class_tp4", f"{dit_class} {TP} parallel.tp=4 run.dir={out}/four_dit_class_tp4",
                 "dit_resumed", f"{dit} {TP} parallel.dp_shard=2 run.dir={out}/tp_resumed",
                 # megatron-core's column/row-parallel functions on the same shards
                 "dit_megatron", f"{dit} {TP} parallel.dp_shard=2 {MEGATRON} run.dir={out}/four_dit_megatron",
                 "dit_class_megatron", f"{dit_class} {TP} parallel.dp_shard=2 {MEGATRON} "
                                       f"run.dir={out}/four_dit_class_megatron",
                 # sequence parallelism: norms, modulation and residuals on 1/tp of the tokens
                 "dit_sp", f"{dit} {TP} parallel.dp_shard=2 parallel.sp=true run.dir={out}/four_dit_sp",
                 "dit_class_sp", f"{dit_class} {TP} parallel.dp_shard=2 parallel.sp=true "
                                 f"run.dir={out}/four_dit_class_sp"])
    return out


def test_hsdp_on_four_ranks_equals_single_process(results):
    ref = load_file(str(results / "single" / "unet_ddp.safetensors"))
    got = load_file(str(results / "four" / "unet_hsdp.safetensors"))
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k
    sizes = json.loads((results / "four" / "unet_hsdp.ema_numel.json").read_text())
    assert all(s["local"] <= 0.5 * s["full"] * 1.05 for s in sizes)  # sharded over dp_shard=2


@pytest.mark.parametrize("model", ["dit", "unet"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_equal_single_process(results, model, engine):
    ref = load_file(str(results / "single" / f"{model}_ddp.safetensors"))
    got = load_file(str(results / "two" / f"{model}_{engine}.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{model}/{engine}: {k} differs by {diff}"
    # both runs really trained 5 steps and checkpointed them
    for run in (f"single_{model}_ddp", f"two_{model}_{engine}"):
        assert (results / run / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    # sampling with the (sharded, under FSDP2) EMA ran on both ranks without disturbing training
    assert (results / f"two_{model}_{engine}" / "samples" / "step_00000005.png").is_file()


def _ema(run_dir):
    arch, acfg = read_model_config(run_dir)
    m = registry.materialize(registry.build(arch, acfg), "cpu", seed=1)
    load_run_weights(run_dir, m, which="ema")
    return m.state_dict()


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_fsdp2_ema_is_sharded_and_equals_single_process(results, model):
    sizes = json.loads((results / "two" / f"{model}_fsdp2.ema_numel.json").read_text())
    full = sizes[0]["full"]
    assert sum(s["local"] for s in sizes) >= full
    for s in sizes:  # each rank holds about half of the EMA (dim-0 shards, small padding)
        assert s["local"] <= 0.5 * full * 1.05, sizes
    single = json.loads((results / "single" / f"{model}_ddp.ema_numel.json").read_text())
    assert single[0]["local"] == single[0]["full"] == full
    ref, got = _ema(results / f"single_{model}_ddp"), _ema(results / f"two_{model}_fsdp2")
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_gradient_accumulation_equals_one_big_batch(results, engine):
    ref = load_file(str(results / "single" / "unet_ddp.safetensors"))
    got = load_file(str(results / "two" / f"unet_{engine}_accum2.safetensors"))
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k


def test_bf16_autocast_trains_close_to_fp32(results):
    ref = load_file(str(results / "single" / "unet_ddp.safetensors"))
    got = load_file(str(results / "single" / "unet_bf16.safetensors"))
    diffs = [(ref[k] - got[k]).abs().max().item() for k in ref]
    assert all(d == d for d in diffs)  # finite
    # Adam moves each weight by at most ~lr per step: 5 steps at 1e-3 bound the gap by 1e-2,
    # while bf16 rounding does show (the runs are not identical).
    assert 0 < max(diffs) <= 1e-2


@pytest.mark.parametrize("case", ["unet_imm", "unet_knn"])
def test_noise_assignment_on_two_ranks_equals_single_process(results, case):
    """Global immiscible assignment under FSDP2 (with Laplace + min-SNR) and KNN under DDP: 2 ranks = 1 process."""
    ref = load_file(str(results / "single" / f"{case}.safetensors"))
    got = load_file(str(results / "two" / f"{case}.safetensors"))
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k
    plain = load_file(str(results / "single" / "unet_ddp.safetensors"))
    assert max((ref[k] - plain[k]).abs().max().item() for k in ref) > 1e-4  # the options changed training


@pytest.mark.parametrize("single,four", [("dit_ddp", "dit_dp2tp2"), ("dit_class", "dit_class_tp4"),
                                         ("dit_ddp", "dit_resumed"), ("dit_ddp", "dit_megatron"),
                                         ("dit_class", "dit_class_megatron"), ("dit_ddp", "dit_sp"),
                                         ("dit_class", "dit_class_sp")])
def test_tensor_parallel_equals_single_process(results, single, four):
    """dp 2 x tp 2 (heads, cross-attention, MLP split; FSDP2 over dp), tp 4 (adaLN-Zero modulation split too), a
    one-process checkpoint at step 2 resumed under dp 2 x tp 2 (plain tensors into strided and row shards),
    megatron-core's implementation (parallel.tp_impl=megatron) and sequence parallelism (parallel.sp) on both DiTs."""
    ref = load_file(str(results / "single" / f"{single}.safetensors"))
    got = load_file(str(results / "four" / f"{four}.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{four}: {k} differs by {diff}"
    if four == "dit_resumed":
        assert (results / "tp_resumed" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    sizes = json.loads((results / "four" / f"{four}.ema_numel.json").read_text())
    assert all(s["local"] < 0.75 * s["full"] for s in sizes), sizes  # the EMA is split like the weights


def test_tensor_parallel_checkpoint_and_ema_grid_read_in_one_process(results):
    """The dp 2 x tp 2 run's EMA, read from its checkpoint by one process (strided q/k/v saved whole, the other
    shards resharded by DCP), equals the single process's; its EMA sample grid equals the single process's."""
    ref, got = _ema(results / "single_dit_grid"), _ema(results / "four_dit_dp2tp2")
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k
    grid = "samples/step_00000005.png"
    a, b = (np.asarray(Image.open(results / r / grid), dtype=np.int16) for r in ("single_dit_grid", "four_dit_dp2tp2"))
    assert np.abs(a - b).max() <= 2
