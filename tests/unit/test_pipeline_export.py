"""``difftrain export RUN --out DIR --pipeline``: a whole diffusers pipeline folder
(difftrain/models/pipeline_export.py) that ``DiffusionPipeline.from_pretrained(DIR)`` loads as the stock
``PixArtSigmaPipeline`` and that, called with the arguments in ``difftrain.json`` and our initial noise, gives the
images ``difftrain sample`` gives.

One real run (a text DiT trained 3 steps on the digits in the latent space of a tiny random AutoencoderKL with a
shift_factor, captions by the packaged MiniLM; VP v-prediction, DDIM in 4 steps) exported through the CLI; the
other diffusion/sampler mappings export the same weights with the run's diffusion and sampling swapped on the
loaded generator (the pipeline must reproduce whatever sampler the export claims)."""
from __future__ import annotations

import dataclasses
import json
import logging
import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from difftrain import cli
from types import SimpleNamespace

from difftrain.config import DiffusionConfig
from difftrain.config_checks import load_config
from difftrain.diffusion.diffusion import build_diffusion
from difftrain.diffusion.keyed import keyed_randn
from difftrain.eval.generator import load_generator
from difftrain.launch.env import shutdown
from difftrain.models import registry
from difftrain.models.dit_export import ExportError
from difftrain.models.pipeline_export import call_arguments, export_pipeline, folded_vae, refusal
from difftrain.sampling import generate, sample_model_space, sample_shape
from difftrain.train.stages.base import SamplingDefaults
from difftrain.train.trainer import Trainer
from tests.conftest import REPO, tiny_vae

diffusers = pytest.importorskip("diffusers")

LATENT_TOL = 1e-4  # max |ours - theirs| of the final latents, relative to max(1, max |ours|)
PIXEL_TOL = 1  # uint8 levels: float32 rounding of the same decode may flip a .5 to the next level
PROMPTS = ["a handwritten digit 3", "A handwritten digit 7 ", "a handwritten digit 0", ""]
SEED = 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """A real run: text DiT (adaLN-single) in a tiny VAE's latent space, VP cosine v-prediction, DDIM 4 steps."""
    root = tmp_path_factory.mktemp("pipeline_export")
    vae = tiny_vae(root / "vae")
    cfg = load_config(REPO / "configs/demo.yaml", [
        "run.steps=3", "run.ckpt_every=3", "run.log_every=1", "run.progress=false", "run.sample_every=0",
        "model.args.depth=2", "model.args.hidden_size=32", "model.args.num_heads=2", "model.in_channels=4",
        "model.image_size=8", f"encoders.vae={vae}", "diffusion.path=vp_cosine", "diffusion.target=v",
        "diffusion.density=uniform", "run.sample_sampler=ddim", "run.sample_steps=4", "run.sample_guidance=2.5",
        "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16", "optim.lr=3e-2",
        "optim.warmup_steps=0", "optim.schedule=constant", "eval.every=0", f"data.train={digits['train']}",
        f"run.dir={root / 'run'}"])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        signals = getattr(trainer, "signals", None)
        if signals is not None:
            signals.restore()
        shutdown()
    return root / "run"


def load_pipeline(folder):
    """``DiffusionPipeline.from_pretrained`` with every diffusers / transformers warning captured."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handlers = [(lg, Keep()) for lg in (dlog.get_logger("diffusers"), tlog.get_logger("transformers"))]
    for lg, h in handlers:
        lg.addHandler(h)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    finally:
        for lg, h in handlers:
            lg.removeHandler(h)
    pipe.set_progress_bar_config(disable=True)
    return pipe, records


def assert_served_equal(g, folder, pipe, records) -> None:
    """The loaded pipeline is the stock class with our components, loaded cleanly, and generates our images."""
    meta = json.loads((folder / "difftrain.json").read_text())
    entry = meta["pipeline"]
    assert type(pipe).__name__ == entry["class"] == "PixArtSigmaPipeline"
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert type(pipe.scheduler).__name__ == meta["scheduler"]["class"]
    assert type(pipe.text_encoder).__name__ == "BertModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    # no warning but the type hint's (PixArt's signature names T5EncoderModel): no weight was left out or left over,
    # no config key ignored (diffusers and transformers warn of each)
    assert all(r.startswith("Expected types for text_encoder: (<class 'transformers.models.t5") for r in records), \
        records
    assert entry["deterministic"]
    n, shape, how = len(PROMPTS), sample_shape(g.acfg), g.sampling
    ours = generate(g.model, g.diffusion, g.conditioner, g.vae, n=n, shape=shape, steps=how.steps,
                    sampler=how.sampler, guidance=how.guidance, seed=SEED, device=CPU, captions=PROMPTS)
    x_T = keyed_randn(SEED, 0, range(n), shape, "sample")  # difftrain sample's initial noise
    call = dict(entry["call"], prompt=PROMPTS)
    assert call["num_inference_steps"] == how.steps and call["guidance_scale"] == how.guidance
    latents = pipe(**call, latents=x_T.clone(), output_type="latent").images
    want = sample_model_space(g.model, g.diffusion, g.conditioner, x_T.clone(), g.conditioner(PROMPTS, None),
                              steps=how.steps, sampler=how.sampler, guidance=how.guidance)
    err = (latents - want).abs().max().item()
    assert err <= LATENT_TOL * max(1.0, want.abs().max().item()), f"latents: max |diff| {err:.2e}"
    assert (want - x_T).abs().max() > 0.1  # the model moved the noise: the comparison is not trivial
    other = pipe(**dict(call, negative_prompt="a"), latents=x_T.clone(), output_type="latent").images
    assert (other - want).abs().max() > 2 * err + LATENT_TOL  # the null prompt matters beyond the tolerance
    images = pipe(**call, latents=x_T.clone(), output_type="np").images  # [n, H, W, C] floats in [0, 1]
    theirs = (images * 255).round().astype(np.uint8)  # what the pipeline's PIL output holds
    assert theirs.shape == ours.shape
    diff = np.abs(theirs.astype(int) - ours.astype(int))
    assert diff.max() <= PIXEL_TOL, f"images differ by up to {diff.max()} levels"
    assert np.ptp(ours) > 0


def test_the_exported_pipeline_reproduces_difftrain_sample(run, tmp_path, capsys):
    out = tmp_path / "export"
    cli.main(["export", str(run), "--out", str(out), "--pipeline"])
    assert "PixArtSigmaPipeline" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"] and index["transformer"][0] == "diffusers"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    meta = json.loads((out / "difftrain.json").read_text())
    assert meta["pipeline"]["call"]["max_sequence_length"] == 12  # configs/demo.yaml's encoders.text_max_length
    assert json.loads((out / "vae" / "config.json").read_text())["shift_factor"] is None  # folded in
    pipe, records = load_pipeline(out)
    assert_served_equal(load_generator(run, CPU), out, pipe, records)
    assert meta["pipeline"]["captions"] == "any"  # MiniLM's tokenizer is uncased
    # difftrain sample reads the pipeline folder too (its transformer/), giving the run's images
    gens = [load_generator(p, CPU) for p in (run, out)]
    assert gens[1].sampling == gens[0].sampling
    same = [generate(g.model, g.diffusion, g.conditioner, g.vae, n=2, shape=sample_shape(g.acfg), steps=4,
                     sampler="ddim", guidance=2.5, seed=SEED, device=CPU, captions=PROMPTS[:2]) for g in gens]
    assert np.array_equal(*same)


@pytest.mark.parametrize("path,target,sampler,steps", [("vp_linear", "eps", "dpmpp_2m", 4),
                                                       ("vp_cosine", "x", "ddim", 2),
                                                       ("vp_cosine", "v", "consistency", 1)])
def test_other_vp_mappings_are_served(run, tmp_path, path, target, sampler, steps):
    """VP eps through DPM-Solver++, x through DDIM, a one-step consistency sampler through LCMScheduler."""
    g = load_generator(run, CPU)
    g = dataclasses.replace(g, diffusion=build_diffusion(DiffusionConfig(path=path, target=target)),
                            sampling=SamplingDefaults(sampler, steps, 2.0))
    cls, scheduler, entry = export_pipeline(g, g.model.state_dict(), tmp_path)
    meta = {"scheduler": scheduler, "pipeline": entry}
    (tmp_path / "difftrain.json").write_text(json.dumps(meta))
    pipe, records = load_pipeline(tmp_path)
    assert_served_equal(g, tmp_path, pipe, records)


def test_the_folded_vae_is_our_latent_space(run):
    """With shift_factor folded into the quant convs, the exported VAE (no shift) encodes to and decodes from our
    latents (z - shift) * scaling_factor."""
    g = load_generator(run, CPU)
    assert g.vae.shift_factor == 0.25
    theirs = folded_vae(g.vae.vae)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = g.vae.encode(x)
    with torch.no_grad():
        mean = theirs.encode(x).latent_dist.mean * theirs.config.scaling_factor
        pixels = theirs.decode(latents / theirs.config.scaling_factor).sample
    assert (mean - latents).abs().max() < 1e-5
    assert (pixels - g.vae.decode(latents)).abs().max() < 1e-5


def test_refusals_name_why_and_write_nothing(run, tmp_path, capsys):
    g = load_generator(run, CPU)
    cfg = g.cfg
    unet_cfg = load_config(None, ["model.name=UNet-T", "model.cond=text", "encoders.text=minilm"])
    unet = registry.build(*registry.arch_config(unet_cfg.model, 384))
    cases = {
        "init_noise_sigma": dict(diffusion=build_diffusion(DiffusionConfig(path="rf", target="velocity"))),
        "use sampler ddim": dict(sampling=SamplingDefaults("euler", 4, 2.0)),
        "divides 1000": dict(sampling=SamplingDefaults("ddim", 3, 2.0)),
        "null class": dict(cfg=dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cond="class",
                                                                                  num_classes=10))),
        "unconditional": dict(cfg=dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cond="none"))),
        "pixel space": dict(cfg=dataclasses.replace(cfg, encoders=dataclasses.replace(cfg.encoders, vae=""))),
        "attention mask": dict(model=unet),
        "video": dict(acfg=SimpleNamespace(frames=3)),
        "control": dict(cfg=dataclasses.replace(cfg, adapt=[{"kind": "lora"}, {"kind": "controlnet"}])),
        "guide only above 1": dict(sampling=SamplingDefaults("ddim", 4, 0.5)),
    }
    for phrase, change in cases.items():
        why = refusal(dataclasses.replace(g, **change))
        assert why and phrase in why and "\n" not in why, (phrase, why)
        with pytest.raises(ExportError, match="cannot export a diffusers pipeline"):
            export_pipeline(dataclasses.replace(g, **change), g.model.state_dict(), tmp_path / phrase)
        assert not (tmp_path / phrase).exists()
    assert refusal(g) is None


def test_the_refusals_are_real(run, tmp_path):
    """diffusers' own code says no: the PixArt pipeline fails on a flow-matching scheduler (init_noise_sigma), and
    DiTPipeline takes no initial latents."""
    g = load_generator(run, CPU)
    export_pipeline(g, g.model.state_dict(), tmp_path)
    pipe, _ = load_pipeline(tmp_path)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(AttributeError, match="init_noise_sigma"):
        pipe(prompt=PROMPTS[:1], latents=keyed_randn(SEED, 0, range(1), sample_shape(g.acfg), "sample"),
             **dict(call_arguments(g), num_inference_steps=2))
    assert "latents" not in inspect.signature(diffusers.DiTPipeline.__call__).parameters
