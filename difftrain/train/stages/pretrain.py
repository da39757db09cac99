"""Pretraining: denoising regression on the configured Diffusion (path, t-density, target).

Images ``pixels`` [B, C, H, W] or, for a video model (``model.frames > 0``), clips [B, T, C, H, W]: the VAE codes
clips frame by frame, noise is keyed per sample over its whole [T, C, H, W], and t [B] broadcasts over all frames.

Pre-encoded batches (``data.kind=latent``, :mod:`difftrain.data.latents`) carry ``latent_mean`` (and ``latent_std``,
``text_states``, ``text_mask``) instead of pixels: the VAE is skipped and ``x0 = mean + std * xi`` with ``xi`` keyed
like the noise on a stream of its own (the posterior mean when there is no std: pixel space); the text encoder is
skipped and the stored states are used, with the same null condition for dropped captions as online.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.data.images import to_unit
from difftrain.diffusion.assign import build_assigner
from difftrain.diffusion.keyed import keyed_rand, keyed_randn
from difftrain.train.stages.base import FrozenPiece, ModuleSpec, Stage


def _stream_seed(seed: int, name: str) -> int:
    """A run seed for a keyed stream of its own: ``keyed_randn(_stream_seed(seed, name), ...)`` never repeats the
    draws of ``seed``'s streams (keyed.STREAMS has no entry for it)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


class PretrainStage(Stage):
    """Denoising regression of one trainable backbone (``backbone``) on the configured Diffusion."""
    name = "pretrain"

    def __init__(self, shared, args=None):
        super().__init__(shared)
        cfg = shared.cfg
        self.diffusion = shared.diffusion
        self.conditioner = shared.conditioner
        self.vae = shared.vae
        self.device = shared.device
        self.frames = cfg.model.frames
        self.caption_dropout = cfg.data.caption_dropout
        self.seed = cfg.run.seed
        self.posterior_seed = _stream_seed(cfg.run.seed, "posterior")
        # diffusion.assign_scope=global gathers over the data-parallel group (none outside a training run)
        group = shared.meshes.dp.get_group() if shared.meshes is not None else None
        self.assigner = build_assigner(cfg.diffusion, seed=cfg.run.seed, group=group)
        if cfg.data.control:  # where control images enter the model (latents, or pixels for the UNet's ControlNet)
            from difftrain.finetune.controlnet import control_space

            self.control_space = control_space(cfg)

    def modules(self) -> dict[str, ModuleSpec]:
        from difftrain.train.sources import parse_optional

        return {"backbone": self.shared.backbone_spec(parse_optional("init_from", self.shared.cfg.init_from))}

    @torch.no_grad()
    def frozen(self, batch: dict, step: int) -> dict:
        cond = self._cond(batch, step)
        if "control" in batch:  # a ControlNet's control image (data.control), as its model reads it
            from difftrain.finetune.controlnet import to_control

            unit = to_unit(batch["control"].to(self.device, non_blocking=True))
            cond = {**cond, "control": to_control(unit, self.control_space, self.vae)}
        return {**batch, "x0": self._x0(batch, step), "cond": cond}

    def frozen_pieces(self, step: int) -> list[FrozenPiece]:
        """The VAE's part (x0) and the text encoder's (cond), each with the module holding its weights."""
        vae = None  # PixelSpace: nothing to hold
        if hasattr(self.vae, "vae"):  # a diffusers AutoencoderKL: the encoder side
            vae = nn.ModuleList([m for m in (self.vae.vae.encoder, getattr(self.vae.vae, "quant_conv", None))
                                 if m is not None])
        return [FrozenPiece("latents", lambda b: {"x0": self._x0(b, step)}, vae, ("x0",)),
                FrozenPiece("text", lambda b: {"cond": self._cond(b, step)}, self.conditioner.text_encoder,
                            ("cond",))]

    @torch.no_grad()
    def _cond(self, batch: dict, step: int) -> dict:
        p = self.caption_dropout
        drop = keyed_rand(self.seed, step, batch["index"], "dropout") < p if p > 0 else None
        text = (batch["text_states"], batch["text_mask"]) if "text_states" in batch else None
        return self.conditioner(batch.get("captions"), batch.get("labels"), drop, text=text)

    @torch.no_grad()
    def _x0(self, batch: dict, step: int) -> torch.Tensor:
        name = "latent_mean" if "latent_mean" in batch else "pixels"
        data = batch[name]
        want = 5 if self.frames > 0 else 4
        if data.ndim != want:
            raise ConfigError(f"config key 'model.frames' = {self.frames} needs "
                              f"{'video [B, T, C, H, W]' if want == 5 else 'image [B, C, H, W]'} batches, "
                              f"but the data gives {name} of shape {tuple(data.shape)}")
        if name == "latent_mean":
            return self._posterior_sample(batch, step)
        return self.vae.encode(to_unit(data.to(self.device, non_blocking=True)))  # uint8 images -> [-1, 1] here

    def _posterior_sample(self, batch: dict, step: int) -> torch.Tensor:
        """Pre-encoded latents: ``mean + std * xi``, xi ~ N(0, I) keyed by (seed, step, sample index) on a stream
        of its own; the mean itself when the shards store no std (pixel space)."""
        mean = batch["latent_mean"].to(self.device, non_blocking=True).float()  # [B, c, h, w] / [B, T, c, h, w]
        if "latent_std" not in batch:
            return mean
        xi = keyed_randn(self.posterior_seed, step, batch["index"], mean.shape[1:], "noise").to(mean)
        return mean + batch["latent_std"].to(self.device, non_blocking=True).float() * xi

    def noise(self, batch: dict, step: int) -> torch.Tensor:
        """The noise paired with each sample: keyed by (seed, step, sample index), then noise assignment."""
        x0, idx = batch["x0"], batch["index"]
        eps = keyed_randn(self.seed, step, idx, x0.shape[1:], "noise").to(x0)
        return self.assigner(x0, eps, step=step, index=idx)  # noise assignment: only the noise rows move

    def draw_t(self, batch: dict, step: int) -> torch.Tensor:
        u = keyed_rand(self.seed, step, batch["index"], "t", torch.float64)
        return self.diffusion.t_from_uniform(u).to(batch["x0"])

    def prepare(self, batch: dict, step: int) -> dict:
        x0 = batch["x0"]
        eps = self.noise(batch, step)
        t = self.draw_t(batch, step)
        x_t = self.diffusion.add_noise(x0, eps, t)
        return {"x0": x0, "eps": eps, "t": t, "x_t": x_t, "cond": batch["cond"], "weight": None}

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.diffusion.loss(pred.float(), prep["x0"], prep["eps"], prep["t"], prep["weight"])
        return per.mean(), per.detach()
