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
    return guided_denoiser(model, cond, uncond, guidance if cond else 1.0, to_x0=diffusion.sample_x0)


@torch.no_grad()
def sample_model_space(model, diffusion: Diffusion, conditioner, x_T: torch.Tensor, cond: dict, *, steps: int,
                       sampler: str, guidance: float, progress: bool = False, noise=None) -> torch.Tensor:
    """The teacher ODE from noise to data in model space: ``x_T`` [B, ...] (noise at t = 1) -> x0 [B, ...] (latents,
    or pixels in [-1, 1] without a VAE; not decoded), integrated by ``sampler`` over the uniform ``steps``-step grid
    from t = 1 to 0 with the CFG-guided denoiser at scale ``guidance`` (unguided without a condition). ``cond`` is
    ``conditioner(captions, labels)`` of the B samples. Batched math may depend on the batch's composition: the same
    x0 bits need the same batch. ``noise(i)``: the fresh noise of step i of a multistep consistency sampler
    (``samplers.STOCHASTIC``; ignored by the ODE solvers)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
    fn = guided_x0(model, diffusion, conditioner, cond, guidance, len(x_T), x_T.device)

    def denoise(x, t):
        point()  # where a training run may stop on an agreed signal, and shows it is alive
        return fn(x, t).float()

    ts = time_grid(steps, 1.0, 0.0).to(x_T.device)
    extra = {"noise": noise} if sampler in STOCHASTIC else {}
    return SAMPLERS[sampler](denoise, x_T, ts, path=diffusion.path, progress=progress, **extra)


@torch.no_grad()
def generate(model, diffusion: Diffusion, conditioner, vae, *, n: int, shape: tuple[int, ...],
             steps: int, sampler: str, guidance: float, seed: int, device: torch.device,
             captions=None, labels=None, batch_size: int = 64, progress: bool = False, start: int = 0) -> np.ndarray:
    """Returns uint8 images [n, H, W, C] for ``shape`` = (C, H, W), or videos [n, T, H, W, C] for (T, C, H, W):
    images ``start ... start + n - 1`` of the seed (``captions`` / ``labels`` are this slice's)."""
    if len(shape) not in (3, 4):
        raise ValueError(f"sample shape must be (C, H, W) or (T, C, H, W), got {tuple(shape)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        cond = conditioner(captions[lo:hi] if captions is not None else None,
                           labels[lo:hi] if labels is not None else None)
        which = range(start + lo, start + hi)
        x_T = keyed_randn(seed, 0, which, shape, "sample").to(device)

        def noise(i, which=which):  # a consistency sampler's fresh noise at step i, keyed per image like x_T
            return keyed_randn(seed, i + 1, which, shape, "sample").to(device)

        x0 = sample_model_space(model, diffusion, conditioner, x_T, cond, steps=steps, sampler=sampler,
                                guidance=guidance, progress=progress, noise=noise)
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
