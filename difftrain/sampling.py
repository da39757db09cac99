"""Generate images (or videos) from a backbone: conditions -> guided denoiser -> stateless sampler -> decode.

One function used by the trainer's sample grids (with the EMA swapped in, on every rank) and by
``difftrain sample``. The starting noise is keyed by (seed, image index), so image i is the same
whatever the batch it is drawn in. A video model (``frames > 0`` in its architecture config) samples
clips of ``sample_shape(acfg)`` = (T, C, H, W); its grid has one row per clip and one column per frame.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from difftrain.diffusion.diffusion import Diffusion
from difftrain.diffusion.guidance import guided_denoiser
from difftrain.diffusion.keyed import keyed_randn
from difftrain.diffusion.samplers import SAMPLERS, STOCHASTIC, time_grid
from difftrain.quant.modules import check_sampling_grid
from difftrain.train.supervise import point


def default_conditions(kind: str, n: int, prompts: list[str], num_classes: int):
    """Cycle through the prompts (text) or the class labels (class) for ``n`` images."""
    if kind == "text":
        prompts = prompts or [""]
        return [prompts[i % len(prompts)] for i in range(n)], None
    if kind == "class":
        return None, torch.arange(n) % num_classes
    return None, None


def sample_shape(acfg) -> tuple[int, ...]:
    """Model-space shape of one sample: (C, S, S) for an image model, (frames, C, S, S) for a video model."""
    image = (acfg.in_channels, acfg.image_size, acfg.image_size)
    frames = getattr(acfg, "frames", 0)
    return (frames, *image) if frames > 0 else image


def guided_x0(model, diffusion: Diffusion, conditioner, cond: dict, guidance: float, n: int, device):
    """``fn(x, t) -> x0^``: the model's data prediction under CFG at scale ``guidance`` (unguided without a
    condition); a guidance-distilled model (``conditioner.guidance_input``) takes w as its ``guidance`` input
    instead, in one forward."""
    if getattr(conditioner, "guidance_input", False) and cond:
        cond = {**cond, "guidance": torch.full((n,), float(guidance), device=device)}
        guidance = 1.0
    uncond = conditioner.null(n) if cond and guidance != 1.0 else {}
    if uncond:  # a control image conditions both branches (as diffusers' ControlNet pipelines do)
        uncond.update({k: cond[k] for k in CONTROL_KEYS if k in cond})
    return guided_denoiser(model, cond, uncond, guidance if cond else 1.0, to_x0=diffusion.sample_x0)


CONTROL_KEYS = ("control", "control_scale")  # a ControlNet's inputs in cond (finetune/controlnet.py)


def windowed_control(fn_on, fn_off, steps: int, start: float, end: float):
    """``fn(x, t)``: ``fn_on`` (with the control image) on step i of ``steps`` (t = 1 - i / steps) when
    ``start <= i / steps`` and ``(i + 1) / steps <= end``, ``fn_off`` otherwise: diffusers' ``control_guidance_start``
    / ``control_guidance_end``, with i read off t (a sampler's later evaluations within a step count as the next
    step's)."""
    def fn(x, t):
        i = round((1.0 - float(t.reshape(-1)[0])) * steps)
        return fn_on(x, t) if start <= i / steps and (i + 1) / steps <= end + 1e-9 else fn_off(x, t)

    return fn


@torch.no_grad()
def sample_model_space(model, diffusion: Diffusion, conditioner, x_T: torch.Tensor, cond: dict, *, steps: int,
                       sampler: str, guidance: float, progress: bool = False, noise=None,
                       control_window: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The teacher ODE from noise to data in model space: ``x_T`` [B, ...] (noise at t = 1) -> x0 [B, ...] (latents,
    or pixels in [-1, 1] without a VAE; not decoded), integrated by ``sampler`` over the uniform ``steps``-step grid
    from t = 1 to 0 with the CFG-guided denoiser at scale ``guidance`` (unguided without a condition). ``cond`` is
    ``conditioner(captions, labels)`` of the B samples. Batched math may depend on the batch's composition: the same
    x0 bits need the same batch. ``noise(i)``: the fresh noise of step i of a multistep consistency sampler
    (``samplers.STOCHASTIC``; ignored by the ODE solvers). A control image in ``cond`` (a ControlNet's) acts on the
    fraction ``control_window`` = (start, end) of the steps (:func:`windowed_control`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
    fn = guided_x0(model, diffusion, conditioner, cond, guidance, len(x_T), x_T.device)
    if "control" in cond and tuple(control_window) != (0.0, 1.0):
        off = guided_x0(model, diffusion, conditioner, {k: v for k, v in cond.items() if k not in CONTROL_KEYS},
                        guidance, len(x_T), x_T.device)
        fn = windowed_control(fn, off, steps, *control_window)

    def denoise(x, t):
        point()  # where a training run may stop on an agreed signal, and shows it is alive
        return fn(x, t).float()

    ts = time_grid(steps, 1.0, 0.0).to(x_T.device)
    check_sampling_grid(model, ts[:-1])  # timestep-aware activation scales: learnt for these t
    extra = {"noise": noise} if sampler in STOCHASTIC else {}
    return SAMPLERS[sampler](denoise, x_T, ts, path=diffusion.path, progress=progress, **extra)


@torch.no_grad()
def generate(model, diffusion: Diffusion, conditioner, vae, *, n: int, shape: tuple[int, ...],
             steps: int, sampler: str, guidance: float, seed: int, device: torch.device,
             captions=None, labels=None, batch_size: int = 64, progress: bool = False, start: int = 0,
             control: torch.Tensor | None = None, control_scale: float = 1.0,
             control_window: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Returns uint8 images [n, H, W, C] for ``shape`` = (C, H, W), or videos [n, T, H, W, C] for (T, C, H, W):
    images ``start ... start + n - 1`` of the seed (``captions`` / ``labels`` are this slice's). ``control``: a
    ControlNet's control image in model space (encoded like the training images), [1 or n, C, H, W], at
    ``control_scale`` over the ``control_window`` fraction of the steps."""
    if len(shape) not in (3, 4):
        raise ValueError(f"sample shape must be (C, H, W) or (T, C, H, W), got {tuple(shape)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        cond = conditioner(captions[lo:hi] if captions is not None else None,
                           labels[lo:hi] if labels is not None else None)
        if control is not None:
            c = control[lo:hi] if len(control) == n else control.expand(hi - lo, *control.shape[1:])
            cond = {**cond, "control": c.to(device), "control_scale": float(control_scale)}
        which = range(start + lo, start + hi)
        x_T = keyed_randn(seed, 0, which, shape, "sample").to(device)

        def noise(i, which=which):  # a consistency sampler's fresh noise at step i, keyed per image like x_T
            return keyed_randn(seed, i + 1, which, shape, "sample").to(device)

        x0 = sample_model_space(model, diffusion, conditioner, x_T, cond, steps=steps, sampler=sampler,
                                guidance=guidance, progress=progress, noise=noise, control_window=control_window)
        pixels = vae.decode(x0).float().clamp(-1, 1)
        channels_last = (0, 2, 3, 1) if pixels.ndim == 4 else (0, 1, 3, 4, 2)  # [.., C, H, W] -> [.., H, W, C]
        out.append(((pixels + 1) * 127.5).round().to(torch.uint8).permute(*channels_last).cpu())
    return torch.cat(out).numpy()


def grid(images: np.ndarray, nrow: int | None = None) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [H', W', C] uint8 image (2 px padding), ``nrow`` images per row.
    Videos [N, T, H, W, C]: one row per video, one column per frame (``nrow`` must be None or T)."""
    from torchvision.utils import make_grid

    if images.ndim == 5:
        N, T = images.shape[:2]
        if nrow not in (None, T):
            raise ValueError(f"a video grid has one column per frame (nrow={T}), got nrow={nrow}")
        images, nrow = images.reshape(N * T, *images.shape[2:]), T
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    return make_grid(t, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()


def save_png(image_hwc: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


class SampleGrid:
    """Trainer callback: every ``run.sample_every`` steps, sample the stage's served model with its EMA weights and
    its sampler, steps and guidance (``Stage.sampling``) on all ranks
    (the EMA stays sharded under FSDP2) and write ``samples/step_N.png`` and a tensorboard grid
    (videos: one row per clip, one column per frame)."""

    def on_step_end(self, trainer, step: int) -> None:
        rc = trainer.cfg.run
        if not rc.sample_every or step % rc.sample_every:
            return
        mc = trainer.cfg.model
        captions, labels = default_conditions(mc.cond, rc.sample_num, rc.sample_prompts, mc.num_classes)
        how = trainer.sampling()  # the stage's sampler, steps and guidance (a student samples as it was trained)
        with trainer.engine.ema_swapped_in():
            images = generate(trainer.served_model(), trainer.diffusion, trainer.conditioner, trainer.vae,
                              n=rc.sample_num, shape=sample_shape(trainer.acfg),
                              steps=how.steps, sampler=how.sampler, guidance=how.guidance,
                              seed=rc.seed, device=trainer.device, captions=captions, labels=labels)
        if trainer.rank == 0:
            cycle = len(rc.sample_prompts) if mc.cond == "text" else mc.num_classes if mc.cond == "class" else 0
            if images.ndim == 5:
                g = grid(images)  # one row per clip, one column per frame
            else:
                g = grid(images, nrow=cycle if 0 < cycle <= 16 else None)  # one column per prompt / class
            save_png(g, trainer.run_dir / "samples" / f"step_{step:08d}.png")
            trainer.metrics.add_image("samples/ema", g, step)
