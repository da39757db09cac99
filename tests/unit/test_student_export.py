"""Students served at their own step count: the scheduler config ``difftrain export`` writes beside the model
(difftrain/models/scheduler_export.py). For every path x target x sampler x step count, either a stock diffusers
scheduler loaded from the export folder, stepping the exported diffusers model, gives our sampler's latents
(``sample_model_space``, the same x_T and per-step noise) to 1e-4, or no scheduler is written and the reason is given.
Random (not zero-initialised) tiny DiTs in-process; the real CLI on trained runs (pretrain with Euler in 4 steps, a
consistency-trained student in 2) is slow-marked."""
from __future__ import annotations

import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from difftrain.config import DiffusionConfig, ModelConfig
from difftrain.diffusion.diffusion import build_diffusion
from difftrain.diffusion.samplers import SAMPLERS
from difftrain.models import registry
from difftrain.models.conditioner import Conditioner
from difftrain.models.dit import DiTConfig
from difftrain.models.scheduler_export import (SUBFOLDER, NoScheduler, load_scheduler, scheduler_for, vp_betas,
                                               write_scheduler)
from difftrain.sampling import sample_model_space

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # max |ours - theirs| of the latents, relative to max(1, max |ours|)
B, C, S, CLASSES, TEXT_DIM, L = 3, 4, 8, 10, 16, 5
GUIDANCE, NOISE_SEED = 1.5, 9
CPU = torch.device("cpu")
STEPS = (1, 2, 3, 4)
CASES = [("rf", "velocity", False), ("rf", "v", False), ("rf", "x", False), ("rf", "eps", False),
         ("vp_cosine", "v", False), ("vp_cosine", "x", False), ("vp_cosine", "eps", False),
         ("vp_cosine", "velocity", False), ("vp_linear", "v", False), ("vp_linear", "x", False),
         ("vp_linear", "eps", False), ("vp_linear", "eps", True)]  # True: pixel space, x0 clipped to [-1, 1]
# (path, target, pixel, sampler, steps) -> the scheduler that must serve it, or a phrase of the refusal
SERVED = {("rf", "velocity", False, "euler", 4): "FlowMatchEulerDiscreteScheduler",
          ("rf", "velocity", False, "ddim", 2): "FlowMatchEulerDiscreteScheduler",
          ("rf", "velocity", False, "dpmpp_2m", 1): "FlowMatchEulerDiscreteScheduler",
          ("rf", "velocity", False, "consistency", 1): "FlowMatchLCMScheduler",
          ("rf", "velocity", False, "consistency", 2): "FlowMatchLCMScheduler",
          ("rf", "velocity", False, "lcm", 4): "FlowMatchLCMScheduler",
          ("vp_cosine", "v", False, "ddim", 4): "DDIMScheduler",
          ("vp_cosine", "v", False, "heun", 1): "DDIMScheduler",
          ("vp_cosine", "v", False, "consistency", 2): "LCMScheduler",
          ("vp_cosine", "x", False, "lcm", 4): "LCMScheduler",
          ("vp_linear", "v", False, "dpmpp_2m", 4): "DPMSolverMultistepScheduler",
          ("vp_linear", "eps", True, "ddim", 1): "DDIMScheduler",
          ("vp_linear", "eps", True, "lcm", 2): "LCMScheduler",
          ("vp_linear", "eps", True, "dpmpp_2m", 2): "DPMSolverMultistepScheduler"}
REFUSED = {("rf", "velocity", False, "dpmpp_2m", 4): "starts at sigma 0.999",
           ("rf", "velocity", False, "heun", 4): "no shift_terminal",
           ("rf", "velocity", False, "consistency_edm", 2): "boundary scalings",
           ("rf", "x", False, "euler", 4): "velocity",
           ("vp_cosine", "v", False, "euler", 4): "use sampler ddim",
           ("vp_cosine", "v", False, "dpmpp_2m", 4): "infinite at t = 1",
           ("vp_cosine", "v", False, "ddim", 3): "divides 1000",
           ("vp_cosine", "eps", False, "ddim", 4): "alpha(1) = 0",
           ("vp_cosine", "velocity", False, "ddim", 4): "dx/dt",
           ("vp_linear", "eps", True, "ddim", 2): "use_clipped_model_output"}


def random_dit(**kw):
    """A tiny DiT with every weight perturbed (zero-init would make the comparison trivial)."""
    cfg = DiTConfig(**{**dict(image_size=S, in_channels=C, num_classes=CLASSES, text_dim=0, patch_size=2,
                              hidden_size=32, depth=2, num_heads=2), **kw})
    model = registry.materialize(registry.build("dit", cfg), CPU, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def noise_of(seed: int):
    """Our consistency sampler's per-step noise, drawn from one generator in step order as diffusers' ``step`` draws
    it from the ``generator`` it is given."""
    g = torch.Generator().manual_seed(seed)
    return lambda i: torch.randn(B, C, S, S, generator=g)


def x_T() -> torch.Tensor:
    return torch.randn(B, C, S, S, generator=torch.Generator().manual_seed(5))


def diffusers_loop(model, scheduler, x, call, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The stock scheduler's own loop: ``set_timesteps(steps)``; per timestep the model output under CFG
    (uncond + w (cond - uncond)) and ``step`` (its fresh noise from a generator seeded ``seed``). No
    ``scale_model_input``: the identity on DDIM/LCM/DPM-Solver, absent from the flow schedulers."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        with torch.no_grad():
            cond, uncond = (call(model, x, t.expand(len(x)), c) for c in (True, False))
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x, generator=gen).prev_sample
    return x


def class_call(labels):
    def call(model, x, t, cond: bool):
        return model(x, timestep=t, class_labels=labels if cond else torch.full_like(labels, CLASSES)).sample
    return call


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    err = (ours - theirs).abs().max().item()
    assert err <= TOL * max(1.0, ours.abs().max().item()), f"{what}: max |diff| {err:.2e}"
    return err


@pytest.fixture(scope="module")
def class_export(tmp_path_factory):
    """A random class-conditional DiT, its diffusers export (the folder ``difftrain export`` writes) and our
    conditioner."""
    model = random_dit()
    folder = tmp_path_factory.mktemp("class_export")
    assert model.save_diffusers(model.state_dict(), folder) == "DiTTransformer2DModel"
    mc = ModelConfig(cond="class", num_classes=CLASSES)
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(folder)).eval()
    return model, theirs, Conditioner(mc, None, CPU)


@pytest.mark.parametrize("path,target,pixel", CASES, ids=lambda v: str(v))
def test_every_sampling_is_reproduced_by_its_scheduler_or_refused(class_export, tmp_path, path, target, pixel):
    model, theirs, conditioner = class_export
    diffusion = build_diffusion(DiffusionConfig(path=path, target=target), pixel_space=pixel)
    labels = torch.tensor([1, 4, 7])
    served, errs = {}, []
    for sampler, steps in itertools.product(SAMPLERS, STEPS):
        out = tmp_path / f"{sampler}_{steps}"
        entry = write_scheduler(out, diffusion, sampler, steps)
        key = (path, target, pixel, sampler, steps)
        if entry["class"] is None:
            assert entry["reason"] and "\n" not in entry["reason"]
            assert not (out / SUBFOLDER).exists()
            assert REFUSED.get(key, entry["reason"]) in entry["reason"], (key, entry["reason"])
            assert key not in SERVED, (key, entry["reason"])
            continue
        served[sampler, steps] = entry["class"]
        assert entry == {"class": entry["class"], "subfolder": SUBFOLDER, "num_inference_steps": steps}
        scheduler = load_scheduler(out)
        assert type(scheduler).__name__ == entry["class"] == SERVED.get(key, entry["class"]), key
        assert key not in REFUSED, key
        ours = sample_model_space(model, diffusion, conditioner, x_T(), conditioner(None, labels), steps=steps,
                                  sampler=sampler, guidance=GUIDANCE, noise=noise_of(NOISE_SEED))
        got = diffusers_loop(theirs, scheduler, x_T(), class_call(labels), steps, GUIDANCE, NOISE_SEED)
        errs.append(assert_close(ours, got, f"{key} via {entry['class']}"))
    # what must be served here is served (a case that refuses everything fails), and each comparison is not trivial
    assert {k[3:] for k in SERVED if k[:3] == (path, target, pixel)} <= set(served)
    if (path, target) in {("rf", "velocity"), ("vp_cosine", "v"), ("vp_linear", "x")}:
        assert len(served) >= 8 and max(errs) > 0


def test_one_step_consistency_and_euler_are_the_same_scheduler_step(class_export, tmp_path):
    """1 step of any first-order sampler (and of the consistency sampler) is x0^(x_T, 1): on rf, Euler's
    x_T - v and FlowMatchLCM's x0 = x_T - v without noise."""
    model, theirs, conditioner = class_export
    diffusion = build_diffusion(DiffusionConfig(path="rf", target="velocity"))
    labels = torch.tensor([0, 5, 9])
    one = {s: sample_model_space(model, diffusion, conditioner, x_T(), conditioner(None, labels), steps=1, sampler=s,
                                 guidance=GUIDANCE, noise=noise_of(NOISE_SEED)) for s in ("euler", "consistency")}
    assert torch.equal(one["euler"], one["consistency"])
    two = sample_model_space(model, diffusion, conditioner, x_T(), conditioner(None, labels), steps=2,
                             sampler="consistency", guidance=GUIDANCE, noise=noise_of(NOISE_SEED))
    assert (two - one["consistency"]).abs().max() > 1e-2  # the second step re-noises and refines: not the same


def test_text_students_through_the_stock_pixart_pipeline(tmp_path):
    """A text DiT exported as PixArtTransformer2DModel: VP students (LCM in 2 steps, DDIM in 4, DPM-Solver++ in 4 on
    vp_linear) through ``PixArtAlphaPipeline`` with our prompt and null-prompt states; rf students through the
    scheduler loop (diffusers 0.42.1's PixArt pipelines read ``init_noise_sigma``, which flow schedulers lack)."""
    model = random_dit(num_classes=0, text_dim=TEXT_DIM, modulation="single")
    assert model.save_diffusers(model.state_dict(), tmp_path) == "PixArtTransformer2DModel"
    g = torch.Generator().manual_seed(2)
    null = (torch.randn(L, TEXT_DIM, generator=g), torch.ones(L, dtype=torch.bool))
    conditioner = Conditioner(ModelConfig(cond="text"), None, CPU, null_text=null)
    states, mask = torch.randn(B, L, TEXT_DIM, generator=g), torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    transformer = diffusers.PixArtTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    null_states, null_mask = null[0].expand(B, -1, -1), null[1].long().expand(B, -1)

    def call(m, x, t, cond: bool):
        s, k = (states, mask.long()) if cond else (null_states, null_mask)
        return m(x, encoder_hidden_states=s, encoder_attention_mask=k, timestep=t).sample

    for path, target, sampler, steps in [("vp_cosine", "v", "lcm", 2), ("vp_cosine", "x", "ddim", 4),
                                         ("vp_linear", "v", "dpmpp_2m", 4), ("rf", "velocity", "euler", 4),
                                         ("rf", "velocity", "consistency", 2)]:
        diffusion = build_diffusion(DiffusionConfig(path=path, target=target))
        assert write_scheduler(tmp_path, diffusion, sampler, steps)["class"]
        ours = sample_model_space(model, diffusion, conditioner, x_T(), conditioner(None, None, text=(states, mask)),
                                  steps=steps, sampler=sampler, guidance=GUIDANCE, noise=noise_of(NOISE_SEED))
        if path == "rf":
            got = diffusers_loop(transformer, load_scheduler(tmp_path), x_T(), call, steps, GUIDANCE, NOISE_SEED)
        else:
            pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                                 scheduler=load_scheduler(tmp_path))
            pipe.set_progress_bar_config(disable=True)
            got = pipe(negative_prompt=None, prompt_embeds=states, prompt_attention_mask=mask.long(),
                       negative_prompt_embeds=null_states, negative_prompt_attention_mask=null_mask, latents=x_T(),
                       num_inference_steps=steps, guidance_scale=GUIDANCE, use_resolution_binning=False,
                       height=S * pipe.vae_scale_factor, width=S * pipe.vae_scale_factor, output_type="latent",
                       generator=torch.Generator().manual_seed(NOISE_SEED)).images
        assert_close(ours, got, f"{path} {target} {sampler} {steps}")


def test_refused_flow_solvers_are_really_off(class_export):
    """Why rf dpmpp_2m and heun get no scheduler: the nearest stock ones sample something else."""
    model, theirs, conditioner = class_export
    diffusion = build_diffusion(DiffusionConfig(path="rf", target="velocity"))
    labels = torch.tensor([2, 3, 8])
    for sampler, scheduler in [("dpmpp_2m", diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction")),
            ("heun", diffusers.FlowMatchHeunDiscreteScheduler())]:
        with pytest.raises(NoScheduler):
            scheduler_for(diffusion, sampler, 4)
        ours = sample_model_space(model, diffusion, conditioner, x_T(), conditioner(None, labels), steps=4,
                                  sampler=sampler, guidance=GUIDANCE)
        got = diffusers_loop(theirs, scheduler, x_T(), class_call(labels), 4, GUIDANCE, NOISE_SEED)
        assert (ours - got).abs().max() > 1e-2, sampler


def test_vp_table_is_our_continuous_path():
    """alphas_cumprod of the written table is alpha(k/1000)^2 (1 at k = 0; 0 at k = 1000 on vp_cosine), which the
    discrete squaredcos_cap_v2 (cosine with offset) is not."""
    for name in ("vp_cosine", "vp_linear"):
        path = build_diffusion(DiffusionConfig(path=name, target="v")).path
        abar = diffusers.DDIMScheduler(num_train_timesteps=1001, trained_betas=vp_betas(path)).alphas_cumprod
        want = path.alpha(torch.arange(1001, dtype=torch.float64) / 1000) ** 2
        assert (abar.double() - want).abs().max() < 1e-6 and abar[0] == 1
        if name == "vp_cosine":
            assert abar[-1] == 0
            cap = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
            assert (cap - want[1:]).abs().max() > 1e-3


def test_a_refused_reexport_removes_the_earlier_scheduler(tmp_path):
    rf = build_diffusion(DiffusionConfig(path="rf", target="velocity"))
    assert write_scheduler(tmp_path, rf, "euler", 4)["class"] == "FlowMatchEulerDiscreteScheduler"
    entry = write_scheduler(tmp_path, rf, "dpmpp_2m", 25)
    assert entry["class"] is None and not (tmp_path / SUBFOLDER).exists()
