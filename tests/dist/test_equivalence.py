"""Tier 2: DDP and FSDP2 on 2 gloo ranks equal a single process on the same global batch
(5 steps, DiT text-conditional with the real MiniLM, UNet class-conditional)."""
import pytest
from safetensors.torch import load_file

from tests.conftest import torchrun

COMMON = "run.steps=5 run.log_every=1 run.ckpt_every=0 run.progress=false data.batch_size=8 " \
         "data.num_workers=0 data.channels=1 data.image_size=16 model.image_size=16 model.in_channels=1 " \
         "optim.lr=1e-3 optim.warmup_steps=2 data.caption_dropout=0.3"
MODELS = {
    "dit": "model.name=DiT-T/2 model.cond=text encoders.text=minilm encoders.text_max_length=8 "
           "model.args.depth=2 model.args.hidden_size=64 model.args.num_heads=4",
    "unet": "model.name=UNet-T model.cond=class model.num_classes=10",
}


@pytest.fixture(scope="module")
def results(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv")

    def cases(engines):
        args = []
        for m, margs in MODELS.items():
            for e in engines:
                args += [f"{m}_{e}", f"{COMMON} {margs} data.train={digits['train']} "
                                     f"parallel.engine={e} run.dir={out}/{m}_{e}"]
        return args

    torchrun(1, ["tests/dist/train_job.py", str(out / "single"), *cases(["ddp"])])
    torchrun(2, ["tests/dist/train_job.py", str(out / "two"), *cases(["ddp", "fsdp2"])])
    return out


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
    for run in (f"{model}_ddp", f"{model}_{engine}"):
        assert (results / run / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
