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

from difftrain.config import Config, ConfigError
from difftrain.data.images import to_unit
from difftrain.diffusion.assign import build_assigner
from difftrain.diffusion.diffusion import Diffusion
from difftrain.diffusion.keyed import keyed_rand, keyed_randn
from difftrain.train.stages.base import FrozenPiece, Stage


class Conditioner:
    """Turns a batch's captions / labels into the model's ``cond`` dict, with keyed dropout to the
    null condition for classifier-free guidance. Shared by training and sampling.

    The text null condition is one tensor pair everywhere: the encoding of ``""`` on its own
    (``TextEncoder.null_states``), or ``null_text`` = ``(states [L, D], mask [L])`` stored with
    pre-encoded shards (``latents.load_latent_data``), which is the same encoding; so a run on
    latent shards needs no text encoder. Dropped rows take it by ``torch.where`` (no host sync)."""

    def __init__(self, cfg: Config, text_encoder: nn.Module | None, device: torch.device,
                 null_text: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kind = cfg.model.cond
        self.num_classes = cfg.model.num_classes
        self.text_encoder = text_encoder
        self.device = device
        self._null_text = None
        if null_text is not None:
            self._null_text = (null_text[0].to(device).float(), null_text[1].to(device).bool())

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [L, D], mask [L])`` of the null caption."""
        if self._null_text is None:
            if self.text_encoder is None:
                raise ConfigError("caption dropout and guidance need the null condition: pass the latent shards' "
                                  "null states (latents.load_latent_data) or a text encoder (encoders.text)")
            states, mask = self.text_encoder.null_states(1, self.device)
            self._null_text = (states[0], mask[0])
        return self._null_text

    @torch.no_grad()
    def __call__(self, captions: list[str] | None, labels: torch.Tensor | None,
                 drop: torch.Tensor | None = None,
                 text: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """``drop``: bool [B], True = use the null condition. ``text``: pre-encoded ``(states [B, L, D],
        mask [B, L])`` used instead of encoding ``captions``."""
        if self.kind == "none":
            return {}
        if self.kind == "class":
            labels = labels.to(self.device).long()
            if drop is not None:
                labels = torch.where(drop.to(self.device), torch.full_like(labels, self.num_classes), labels)
            return {"class_labels": labels}
        if text is None:
            states, mask = self.text_encoder.encode(list(captions), self.device)  # [B, L, D], [B, L]
        else:
            states = text[0].to(self.device, non_blocking=True).float()
            mask = text[1].to(self.device, non_blocking=True).bool()
        if drop is not None:
            null_states, null_mask = self.null_text()  # [L, D], [L]
            d = drop.to(self.device)
            states = torch.where(d[:, None, None], null_states, states)
            mask = torch.where(d[:, None], null_mask, mask)
        return {"text_states": states, "text_mask": mask}

    def null(self, n: int) -> dict:
        if self.kind == "text":
            states, mask = self.null_text()
            return {"text_states": states.expand(n, -1, -1), "text_mask": mask.expand(n, -1)}
        return self(None, torch.full((n,), self.num_classes), torch.ones(n, dtype=torch.bool))


def _stream_seed(seed: int, name: str) -> int:
    """A run seed for a keyed stream of its own: ``keyed_randn(_stream_seed(seed, name), ...)`` never repeats the
    draws of ``seed``'s streams (keyed.STREAMS has no entry for it)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


class PretrainStage(Stage):
    name = "pretrain"

    def __init__(self, cfg: Config, backbone: nn.Module, diffusion: Diffusion, conditioner: Conditioner,
                 vae: nn.Module, device: torch.device, dp_group=None):
        """``dp_group``: the data-parallel process group, used by ``diffusion.assign_scope=global``; None = the
        default group when torch.distributed is initialised, else no distribution."""
        self.cfg = cfg
        self.backbone = backbone
        self.diffusion = diffusion
        self.conditioner = conditioner
        self.vae = vae
        self.device = device
        self.seed = cfg.run.seed
        self.posterior_seed = _stream_seed(cfg.run.seed, "posterior")
        self.assigner = build_assigner(cfg.diffusion, seed=cfg.run.seed, group=dp_group)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def frozen_modules(self) -> dict[str, nn.Module]:
        mods = {"vae": self.vae}
        if self.conditioner.text_encoder is not None:
            mods["text_encoder"] = self.conditioner.text_encoder
        return mods

    @torch.no_grad()
    def frozen(self, batch: dict, step: int) -> dict:
        return {**batch, "x0": self._x0(batch, step), "cond": self._cond(batch, step)}

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
        p = self.cfg.data.caption_dropout
        drop = keyed_rand(self.seed, step, batch["index"], "dropout") < p if p > 0 else None
        text = (batch["text_states"], batch["text_mask"]) if "text_states" in batch else None
        return self.conditioner(batch.get("captions"), batch.get("labels"), drop, text=text)

    @torch.no_grad()
    def _x0(self, batch: dict, step: int) -> torch.Tensor:
        name = "latent_mean" if "latent_mean" in batch else "pixels"
        data = batch[name]
        want = 5 if self.cfg.model.frames > 0 else 4
        if data.ndim != want:
            raise ConfigError(f"config key 'model.frames' = {self.cfg.model.frames} needs "
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

    def prepare(self, batch: dict, step: int) -> dict:
        x0, idx = batch["x0"], batch["index"]
        eps = keyed_randn(self.seed, step, idx, x0.shape[1:], "noise").to(x0)
        eps = self.assigner(x0, eps, step=step, index=idx)  # noise assignment: only the noise rows move
        t = self.diffusion.t_from_uniform(keyed_rand(self.seed, step, idx, "t", torch.float64)).to(x0)
        x_t = self.diffusion.add_noise(x0, eps, t)
        return {"x0": x0, "eps": eps, "t": t, "x_t": x_t, "cond": batch["cond"], "weight": None}

    def forward(self, model: nn.Module, prep: dict) -> torch.Tensor:
        return model(prep["x_t"], prep["t"], prep["cond"])

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.diffusion.loss(pred.float(), prep["x0"], prep["eps"], prep["t"], prep["weight"])
        return per.mean(), per.detach()
