"""The diffusers scheduler an export is served with: the config of a stock scheduler that reproduces our sampler.

``difftrain export`` writes ``DIR/scheduler/scheduler_config.json`` (the layout of a pipeline folder's scheduler)
beside the model folder at ``DIR`` when a stock scheduler, driven by its own ``set_timesteps(n)`` and ``step``, takes
the same steps as our sampler (``difftrain.diffusion.samplers``) at the run's saved sampling (sampler, n steps; the
CFG scale is the pipeline's ``guidance_scale``, kept in ``difftrain.json``'s ``sampling``). Otherwise it writes none
and ``difftrain.json`` says why (``"scheduler": {"class": null, "reason": ...}``): a scheduler that samples
something else is never written. tests/unit/test_student_export.py checks every path x target x sampler x n in
1-4: the exported model + the scheduler give our latents to 1e-4 (measured: <= 2e-7 on rf, <= 2e-6 on VP paths,
3e-5 for pixel-space eps on vp_linear, where x0 = (x - sigma eps) / alpha(1) amplifies float32 rounding 150x).

Our samplers step on the uniform grid t_i = 1 - i/n (``time_grid(n, 1, 0)``); the model sees timestep 1000 t
(``difftrain.json``'s ``timestep_scale``). Every claim below is read from diffusers 0.42.1's ``schedulers/``.
In one step every ODE sampler (euler, ddim, heun, dpmpp_2m) returns x0^(x_T, 1), served as ddim.

Rectified flow (``diffusion.path=rf``) with ``diffusion.target=velocity`` (eps - x0: diffusers' flow prediction,
x0 = x - sigma out):

* euler, ddim (the same step on rf): ``FlowMatchEulerDiscreteScheduler(shift=1, shift_terminal=1/n)``,
  x += (s - t) v.
* consistency (multistep consistency sampling, Song et al. 2023 Alg. 1, boundary none): ``FlowMatchLCMScheduler``
  (same grid), x0 = x - t v, x = (1 - s) x0 + s z. lcm / consistency_edm likewise where their boundary scalings are
  within 1e-6 of f = x0^ on the grid (lcm's always are at n <= 20: c_skip = 0.25 / ((10 * 1000 t)^2 + 0.25)).
* The flow schedulers' ``set_timesteps(n)`` spaces sigma from 1 to sigma_min = 1/1000 and appends 0;
  ``shift_terminal`` (LTX-Video's stretch, 1 - (1 - sigma) / scale) moves the last sigma before 0 to 1/n, which
  makes the grid 1, 1 - 1/n, ..., 1/n, 0: ours (n = 1 needs none: [1, 0]). So the config serves the student at its
  own n; at another step count it samples a valid grid that ends at 1/n, not ours.

VP paths (``vp_cosine``, ``vp_linear``: alpha^2 + sigma^2 = 1), prediction_type v -> ``v_prediction``, x ->
``sample``, eps -> ``epsilon``; a pixel-space eps model's x0 clamp (``Diffusion.x0_clip``) -> ``clip_sample`` (DDIM,
LCM) or ``thresholding`` with ``sample_max_value=1`` (DPM-Solver: its percentile is clamped to [1, 1], a clamp).
The schedule is ``trained_betas`` of a 1001-entry table alphas_cumprod[k] = alpha(k/1000)^2, k = 0 ... 1000
(``num_train_timesteps=1001``; beta_0 = 0 so alphas_cumprod[0] = 1 is the data end; on vp_cosine alphas_cumprod[1000]
= 0 exactly), so the table index is the model's timestep 1000 t; float32 cumprod keeps it within 1e-6 of alpha^2.
The stock ``squaredcos_cap_v2`` (Nichol & Dhariwal's discretised cosine *with* offset s = 0.008 and capped betas) is
not our continuous cosine (> 1e-3 apart). Timesteps are integers, so n must divide 1000.

* ddim: ``DDIMScheduler(timestep_spacing="leading", steps_offset=1000/n, set_alpha_to_one=True)``: timesteps
  (1001 // n) i + 1000/n = 1000 - 1000 i/n, each step to the timestep 1001 // n = 1000/n below, the last to
  alphas_cumprod[0] = 1 (n = 1: to -1, ``final_alpha_cumprod`` = 1).
* consistency, lcm: ``LCMScheduler(original_inference_steps=1001)``: its skipping-step grid over all 1001 timesteps
  picks floor(1001 i/n) = 1000 i/n below 1000; ``timestep_scaling`` 10 for lcm (LCM eq. 9, as ours:
  ``consistency.lcm_scalings(1000 t)``), 1e6 for consistency (c_skip < 3e-13, c_out = 1 in float32).
* dpmpp_2m on vp_linear: ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint, ``lower_order_final``,
  ``final_sigmas_type="zero"``, ``timestep_spacing="linspace"``: linspace(0, 1000, n + 1)), our Lu et al. Alg. 2
  with the first step and the step to 0 first order.

Refused (the reason is one line in ``difftrain.json`` and on the console):
* heun on rf: ``FlowMatchHeunDiscreteScheduler`` has no ``shift_terminal``: its Heun steps end at sigma 0.001, not
  1/n (0.2 off ours at 4 steps).
* dpmpp_2m on rf: ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")`` starts at
  sigma = 1 - 1/1000 (not 1) with integer timesteps, so its log-SNR steps differ from ours (whose log-SNR at t = 1 is
  clamped): 0.1 off at 4 steps, 0.02 at 25. The default pretrain sampling (dpmpp_2m, 25 steps) thus gets none.
* euler, heun on VP paths (Euler/Heun in t has no diffusers scheduler; ``EulerDiscreteScheduler`` steps in
  sigma/alpha, where Euler is DDIM); dpmpp_2m on vp_cosine (sigma/alpha is infinite at t = 1: NaN).
* consistency_edm where its scalings are not within 1e-6 of f = x0^ (no stock scheduler applies EDM's).
* a non-velocity target on rf (the flow schedulers take the velocity only); velocity on VP paths (no diffusers
  prediction_type is dx/dt); eps on vp_cosine (diffusers divides by sqrt(alphas_cumprod[1000]) = 0); DDIM with a
  clipped eps at n >= 2 (diffusers re-derives eps from the clipped x0 only with ``step(use_clipped_model_output=
  True)``, which pipelines do not pass); x_eps; a VP step count that does not divide 1000.

The export stays a model folder at ``DIR`` (what ``load_generator``, ``init_from`` and ``from_pretrained(DIR)``
read), with no ``model_index.json``: no stock pipeline could load it alone (``DiTPipeline`` needs an ``AutoencoderKL``,
hard-codes ImageNet's null class 1000 and takes no latents; ``PixArtAlphaPipeline`` needs T5 or prompt embeddings).
Serving, with ``scheduler = load_scheduler(DIR)`` (= ``<_class_name>.from_pretrained(DIR, subfolder="scheduler")``):
a VP text student through the stock ``PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None,
transformer=PixArtTransformer2DModel.from_pretrained(DIR), scheduler=scheduler)`` with ``prompt_embeds`` (and
``negative_prompt=None`` + our null caption's states as ``negative_prompt_embeds``), ``latents``,
``use_resolution_binning=False``, ``output_type="latent"``; in diffusers 0.42.1 the PixArt pipelines cannot drive
the flow schedulers (they read ``init_noise_sigma``, which those lack), so rf students and class DiTs run the
scheduler's own loop: ``set_timesteps(n)``; for t in ``timesteps``: out = uncond + w (cond - uncond) of
``model(x, timestep=t, ...)`` (our null class label is ``num_classes``); ``x = step(out, t, x, generator=g)
.prev_sample``. A stochastic scheduler draws its fresh noise from ``generator``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SUBFOLDER = "scheduler"
TOL = 1e-6  # boundary scalings this close to f = x0^ (|a|, |1 - b| on the grid) are served as f = x0^
TABLE = 1000  # the VP table's last index: the model's timestep at t = 1
ONE_STEP = ("euler", "ddim", "heun", "dpmpp_2m")  # in one step to t = 0 each returns x0^(x_T, 1) (samplers.py)
TARGET_TYPE = {"v": "v_prediction", "x": "sample", "eps": "epsilon"}


class NoScheduler(ValueError):
    """No stock diffusers scheduler reproduces the sampler; the message is the one-line reason."""


def vp_betas(path) -> list[float]:
    """``trained_betas`` of the 1001-entry table alphas_cumprod[k] = alpha(k / 1000)^2 (beta_k = 1 - abar_k /
    abar_{k-1}, beta_0 = 1 - abar_0 = 0)."""
    abar = path.alpha(torch.arange(TABLE + 1, dtype=torch.float64) / TABLE) ** 2
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return (1.0 - abar / prev).clamp(0.0, 1.0).tolist()


def _near_x0(sampler: str, steps: int, path) -> bool:
    """Whether the consistency sampler's boundary scalings are within TOL of f = x0^ at every evaluated time."""
    from difftrain.diffusion.consistency import boundary_coefficients
    from difftrain.diffusion.samplers import time_grid

    boundary = {"consistency": "none", "lcm": "lcm", "consistency_edm": "edm"}[sampler]
    a, b = boundary_coefficients(boundary, time_grid(steps, 1.0, 0.0)[:-1], path)
    return float(a.abs().max()) <= TOL and float((1 - b).abs().max()) <= TOL


def scheduler_for(diffusion, sampler: str, steps: int) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of the scheduler that reproduces ``sampler`` in ``steps`` steps on
    ``diffusion`` (its path, target and x0 clip); ``NoScheduler`` with the reason otherwise."""
    from difftrain.diffusion.samplers import SAMPLERS

    path, target = diffusion.path.name, diffusion.target_kind
    consistency = sampler in ("consistency", "lcm", "consistency_edm")
    if steps == 1 and sampler in ONE_STEP:
        sampler = "ddim"
    if sampler not in SAMPLERS:
        raise NoScheduler(f"unknown sampler '{sampler}'")
    if target == "x_eps":
        raise NoScheduler("diffusion.target=x_eps (x and eps merged by the noise level) has no diffusers "
                          "prediction_type")
    if path == "rf":
        if target != "velocity":
            raise NoScheduler(f"diffusion.target={target} on rf: diffusers' flow schedulers take the velocity "
                              "eps - x0 (flow_prediction) only; train with diffusion.target=velocity")
        grid = dict(num_train_timesteps=TABLE, shift=1.0, use_dynamic_shifting=False,
                    shift_terminal=1.0 / steps if steps > 1 else None)
        if sampler in ("euler", "ddim"):
            return "FlowMatchEulerDiscreteScheduler", grid
        if consistency:
            if not _near_x0(sampler, steps, diffusion.path):
                raise NoScheduler(f"sampler {sampler} on rf: FlowMatchLCMScheduler has no boundary scalings and "
                                  f"{sampler}'s differ from f = x0^ by more than {TOL:g} on the {steps}-step grid")
            return "FlowMatchLCMScheduler", grid
        if sampler == "heun":
            raise NoScheduler("sampler heun on rf: FlowMatchHeunDiscreteScheduler has no shift_terminal, so its "
                              f"Heun steps end at sigma 0.001, not at 1/{steps} (0.2 off ours at 4 steps)")
        if sampler == "dpmpp_2m":
            raise NoScheduler("sampler dpmpp_2m on rf: DPMSolverMultistepScheduler(use_flow_sigmas=True) starts at "
                              "sigma 0.999, not 1, so its log-SNR steps differ (0.1 off ours at 4 steps, 0.02 at 25)")
        raise NoScheduler(f"sampler {sampler} on rf has no diffusers scheduler")
    # VP paths: a table indexed by the model's timestep 1000 t
    t = torch.linspace(0, 1, TABLE + 1, dtype=torch.float64)
    if float((diffusion.path.alpha(t) ** 2 + diffusion.path.sigma(t) ** 2 - 1).abs().max()) > 1e-12:
        raise NoScheduler(f"diffusion.path={path} is neither rf nor variance preserving (diffusers' alphas_cumprod)")
    if target == "velocity":
        raise NoScheduler(f"diffusion.target=velocity on {path}: no diffusers prediction_type is dx/dt on a VP path")
    terminal_snr_zero = float(diffusion.path.alpha(torch.tensor(1.0, dtype=torch.float64))) == 0.0
    if target == "eps" and terminal_snr_zero:
        raise NoScheduler(f"diffusion.target=eps on {path}: diffusers divides by sqrt(alphas_cumprod) = alpha(1) = 0 "
                          "at the first step (t = 1)")
    if sampler in ("euler", "heun"):
        raise NoScheduler(f"sampler {sampler} on {path}: {sampler} in t on a VP path has no diffusers scheduler "
                          "(EulerDiscrete/HeunDiscrete step in sigma/alpha; Euler there is DDIM: use sampler ddim)")
    if sampler == "dpmpp_2m" and terminal_snr_zero:
        raise NoScheduler(f"sampler dpmpp_2m on {path}: DPMSolverMultistepScheduler works in sigma/alpha, which is "
                          "infinite at t = 1 (alpha = 0): NaN")
    if TABLE % steps:
        raise NoScheduler(f"{steps} steps on {path}: diffusers feeds integer timesteps and 1000 i/{steps} is not one "
                          "(use a step count that divides 1000)")
    table = dict(num_train_timesteps=TABLE + 1, trained_betas=vp_betas(diffusion.path),
                 prediction_type=TARGET_TYPE[target])
    # DDIM, LCM: x0 clamped to the range, and the step to t = 0 lands on alphas_cumprod = 1
    clipped = dict(table, clip_sample=diffusion.x0_clip > 0, clip_sample_range=diffusion.x0_clip or 1.0,
                   set_alpha_to_one=True)
    if sampler == "ddim":
        if target == "eps" and diffusion.x0_clip > 0 and steps > 1:
            raise NoScheduler("sampler ddim with a clipped eps prediction (pixel space): DDIMScheduler re-derives eps "
                              "from the clipped x0 only with step(use_clipped_model_output=True), which pipelines "
                              "do not pass")
        return "DDIMScheduler", dict(clipped, timestep_spacing="leading", steps_offset=TABLE // steps)
    if sampler == "dpmpp_2m":
        if diffusion.x0_clip not in (0.0, 1.0):
            raise NoScheduler(f"sampler dpmpp_2m with an x0 clip of {diffusion.x0_clip}: DPMSolverMultistepScheduler "
                              "clamps only through dynamic thresholding, a plain clamp at 1 alone")
        # "linspace" timesteps: linspace(0, 1000, n + 1) rounded, reversed, i.e. 1000 - 1000 i/n; the x0 clamp is
        # its thresholding with sample_max_value = 1 (the percentile s is clamped to [1, 1])
        return "DPMSolverMultistepScheduler", dict(
            table, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
            final_sigmas_type="zero", timestep_spacing="linspace", thresholding=diffusion.x0_clip > 0,
            sample_max_value=diffusion.x0_clip or 1.0)
    if sampler == "lcm":
        return "LCMScheduler", dict(clipped, original_inference_steps=TABLE + 1, timestep_scaling=10.0)
    if not _near_x0(sampler, steps, diffusion.path):
        raise NoScheduler(f"sampler {sampler} on {path}: LCMScheduler's boundary scalings are LCM's; "
                          f"{sampler}'s are neither those nor within {TOL:g} of f = x0^")
    return "LCMScheduler", dict(clipped, original_inference_steps=TABLE + 1, timestep_scaling=1e6)


def write_scheduler(out_dir: str | Path, diffusion, sampler: str, steps: int) -> dict:
    """Write ``out_dir/scheduler/scheduler_config.json`` when a stock scheduler reproduces the sampling; returns the
    ``difftrain.json`` entry: ``{"class", "subfolder", "num_inference_steps"}``, or ``{"class": None, "reason"}``."""
    import diffusers

    folder = Path(out_dir) / SUBFOLDER
    try:
        name, kwargs = scheduler_for(diffusion, sampler, steps)
    except NoScheduler as e:
        (folder / "scheduler_config.json").unlink(missing_ok=True)  # an earlier export's into the same folder
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return {"class": None, "reason": str(e)}
    getattr(diffusers, name)(**kwargs).save_pretrained(str(folder))
    return {"class": name, "subfolder": SUBFOLDER, "num_inference_steps": steps}


def load_scheduler(folder: str | Path):
    """The scheduler an export was written with (its ``_class_name``), from ``folder/scheduler``."""
    import diffusers

    name = json.loads((Path(folder) / SUBFOLDER / "scheduler_config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(str(folder), subfolder=SUBFOLDER)
