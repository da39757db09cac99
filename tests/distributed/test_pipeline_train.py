"""Tier 2: the trainer with ``parallel.pp=2`` (2 gloo ranks, one launch; pp=2 x dp=2 with DDP and FSDP2, and
pp=2 x tp=2, on 4) equals a single process on the same global batch: 1F1B and GPipe with the frozen work in the bubbles, 1F1B with it pre-computed, interleaved 1F1B
and ZB-V with the balanced fallback, the UNet; and checkpoints cross between pipelined and plain runs both
ways (resumed runs end where an uninterrupted single process ends). Weights are read back from each run's DCP
checkpoint, which the segments write together."""
import pytest
import torch

from difftrain.models import registry
from difftrain.train.build import read_model_config
from difftrain.train.sources import load_run_weights
from tests.conftest import tiny_vae, torchrun
from tests.distributed.test_equivalence import COMMON, MODELS

DEEP = "model.args.depth=4"  # 4 blocks: two segments per rank for interleaved 1F1B and ZB-V
PP = "parallel.pp=2 parallel.pp_microbatches=4"
CASES = {
    "dit_1f1b_fill": ("dit", f"{PP} parallel.pp_schedule=1f1b parallel.pp_frozen=fill "
                             "run.sample_every=5 run.sample_num=4 run.sample_steps=2"),  # + EMA samples
    "dit_gpipe_fill": ("dit", f"{PP} parallel.pp_schedule=gpipe"),
    "dit_1f1b_balanced": ("dit", f"{PP} parallel.pp_schedule=1f1b parallel.pp_frozen=balanced"),
    "dit_interleaved": ("dit", f"{PP} parallel.pp_schedule=interleaved_1f1b {DEEP}"),
    "dit_zero_bubble": ("dit", f"{PP} parallel.pp_schedule=zero_bubble {DEEP}"),
    "unet_1f1b_fill": ("unet", f"{PP} parallel.pp_schedule=1f1b"),
    # the text encoder held by one pp rank (a tolerance that accepts any slowdown forces it), sampled at step 5
    "dit_1f1b_partition": ("dit", f"{PP} parallel.pp_frozen_owners=partition parallel.pp_frozen_tolerance=10 "
                                  "run.sample_every=5 run.sample_num=4 run.sample_steps=2"),
    "dit_zero_bubble_partition": ("dit", f"{PP} parallel.pp_schedule=zero_bubble {DEEP} "
                                         "parallel.pp_frozen_owners=partition"),
}


FOUR = {"dit_pp2_ddp2": "parallel.engine=ddp", "dit_pp2_fsdp2": "parallel.engine=fsdp2",
        # tensor parallelism inside the segments (2 tp ranks per stage), sampled: the EMA gathered whole over pp x tp
        "dit_pp2_tp2": "parallel.engine=fsdp2 parallel.tp=2 run.sample_every=5 run.sample_num=4 run.sample_steps=2"}


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("pptrain")
    base = f"{COMMON} data.train={digits['train']}"
    vae = f"encoders.vae={tiny_vae(out / 'vae')} model.in_channels=4 model.image_size=8"  # latent space
    single = []
    samples = "run.sample_every=5 run.sample_num=4 run.sample_steps=2"
    for m, extra in (("dit", samples), ("dit_deep", DEEP), ("unet", ""), ("dit_vae", vae)):
        single += [m, f"{base} {MODELS[m.split('_')[0]]} {extra} run.dir={out}/single_{m}"]
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"), *single], timeout=400)
    two = []
    for name, (m, extra) in CASES.items():
        two += [name, f"{base} {MODELS[m]} {extra} run.dir={out}/{name}"]
    dit = f"{base} {MODELS['dit']}"
    # the VAE encoder and the text encoder each held by one pp rank, sampled (decoded) at step 5
    two += ["dit_vae_partition", f"{dit} {vae} {PP} parallel.pp_frozen_owners=partition "
            f"parallel.pp_frozen_tolerance=10 run.sample_every=5 run.sample_num=4 run.sample_steps=2 "
            f"run.dir={out}/dit_vae_partition"]
    # checkpoints across: 3 steps pipelined, resumed plain (DDP on 2 ranks) to 5; and the other way round
    two += ["pp_then_plain_a", f"{dit} {PP} run.steps=3 run.dir={out}/pp_then_plain",
            "pp_then_plain_b", f"{dit} run.dir={out}/pp_then_plain",
            "plain_then_pp_a", f"{dit} run.steps=3 run.dir={out}/plain_then_pp",
            "plain_then_pp_b", f"{dit} {PP} run.dir={out}/plain_then_pp"]
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"), *two], timeout=600)
    four = []  # pp x dp on 4 ranks: gradients all-reduced after the schedule (ddp) or sharded (fsdp2)
    for name, engine in FOUR.items():
        four += [name, f"{dit} {PP} {engine} run.dir={out}/{name}"]
    torchrun(4, ["tests/distributed/train_job.py", str(out / "four"), *four], timeout=600)
    return out


def _weights(run_dir):
    arch, acfg = read_model_config(run_dir)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    step = load_run_weights(run_dir, model, which="model")
    return step, {k: v.detach() for k, v in model.state_dict().items()}


def _same(ref_dir, got_dir):
    ref_step, ref = _weights(ref_dir)
    step, got = _weights(got_dir)
    assert step == ref_step == 5
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{got_dir.name}: {k} differs by {diff}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipelined_trainer_equals_single_process(runs, case):
    model, extra = CASES[case]
    ref = "single_dit_deep" if "depth=4" in extra else f"single_{model}"
    _same(runs / ref, runs / case)


@pytest.mark.parametrize("run", sorted(FOUR))
def test_pipeline_times_data_parallel_on_four_ranks(runs, run):
    _same(runs / "single_dit", runs / run)


@pytest.mark.parametrize("run", ["pp_then_plain", "plain_then_pp"])
def test_checkpoints_cross_between_pipelined_and_plain(runs, run):
    _same(runs / "single_dit", runs / run)


def test_pipelined_run_logs_losses_and_samples(runs):
    """The pipelined run's per-step losses reach the logs (sent from the last segment) and equal the single
    process's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(d):
        acc = EventAccumulator(str(d / "tb"))
        acc.Reload()
        return [e.value for e in acc.Scalars("loss")]

    # sampling gathers the segments' EMA weights into a whole model: the single process's grid
    import numpy as np
    from PIL import Image

    grids = [np.asarray(Image.open(runs / d / "samples" / "step_00000005.png"), dtype=np.int16)
             for d in ("single_dit", "dit_1f1b_fill", "dit_pp2_tp2")]
    assert grids[0].std() > 10 and np.abs(grids[0] - grids[1]).max() <= 2 and np.abs(grids[0] - grids[2]).max() <= 2
    ref, got = losses(runs / "single_dit"), losses(runs / "dit_1f1b_fill")
    assert len(got) == len(ref) == 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_latent_space_run_with_partitioned_vae_and_text_encoder(runs):
    """A real (tiny, random) diffusers VAE: its encoder and the text encoder go to different pp ranks; the run
    equals a single process and decodes samples."""
    import json

    _same(runs / "single_dit_vae", runs / "dit_vae_partition")
    plans = json.loads((runs / "two" / "dit_vae_partition.pp.json").read_text())
    owners = plans[0]["owners"]
    assert len(owners["text"]) == len(owners["latents"]) == 1 and owners["text"] != owners["latents"]
    for rank, p in enumerate(plans):
        assert p["offloaded"] == 1  # the module the other rank holds
        assert set(p["placement"]) | set(p["current"]) == {n for n, rs in owners.items() if rank in rs}
    assert (runs / "dit_vae_partition" / "samples" / "step_00000005.png").stat().st_size > 0


@pytest.mark.parametrize("case", ["dit_1f1b_partition", "dit_zero_bubble_partition"])
def test_frozen_modules_partitioned_across_pp_ranks(runs, case):
    """``pp_frozen_owners=partition``: the text encoder is held by one pp rank, only that rank runs its pieces
    (both the next step's and, at the first step, the step's own), the other keeps it in host memory; the run
    still equals a single process (test above) and samples (the module comes back for sampling)."""
    import json

    plans = json.loads((runs / "two" / f"{case}.pp.json").read_text())
    owners = plans[0]["owners"]
    assert all(p["owners"] == owners for p in plans) and len(owners["text"]) == 1
    holder = owners["text"][0]
    for rank, p in enumerate(plans):
        ran = set(p["placement"]) | set(p["current"])
        assert ("text" in ran) == (rank == holder) or case.startswith("dit_zero")
        assert p["offloaded"] == (rank != holder)
    if case == "dit_1f1b_partition":
        assert (runs / case / "samples" / "step_00000005.png").stat().st_size > 0
