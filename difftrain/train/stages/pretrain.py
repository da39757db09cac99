"""Pretraining: denoising regression on the configured Diffusion (path, t-density, target)."""
from __future__ import annotations

import torch
from torch import nn

from difftrain.config import Config
from difftrain.diffusion.diffusion import Diffusion
from difftrain.diffusion.keyed import keyed_rand, keyed_randn
from difftrain.train.stages.base import Stage


class Conditioner:
    """Turns a batch's captions / labels into the model's ``cond`` dict, with keyed dropout to the
    null condition for classifier-free guidance. Shared by training and sampling."""

    def __init__(self, cfg: Config, text_encoder: nn.Module | None, device: torch.device):
        self.kind = cfg.model.cond
        self.num_classes = cfg.model.num_classes
        self.text_encoder = text_encoder
        self.device = device

    @torch.no_grad()
    def __call__(self, captions: list[str] | None, labels: torch.Tensor | None,
                 drop: torch.Tensor | None = None) -> dict:
        """``drop``: bool [B], True = use the null condition."""
        if self.kind == "none":
            return {}
        if self.kind == "class":
            labels = labels.to(self.device).long()
            if drop is not None:
                labels = torch.where(drop.to(self.device), torch.full_like(labels, self.num_classes), labels)
            return {"class_labels": labels}
        captions = list(captions)
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        states, mask = self.text_encoder.encode(captions, self.device)
        return {"text_states": states, "text_mask": mask}

    def null(self, n: int) -> dict:
        return self(["" for _ in range(n)], torch.full((n,), self.num_classes), None)


class PretrainStage(Stage):
    name = "pretrain"

    def __init__(self, cfg: Config, backbone: nn.Module, diffusion: Diffusion, conditioner: Conditioner,
                 vae: nn.Module, device: torch.device):
        self.cfg = cfg
        self.backbone = backbone
        self.diffusion = diffusion
        self.conditioner = conditioner
        self.vae = vae
        self.device = device
        self.seed = cfg.run.seed

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def frozen_modules(self) -> dict[str, nn.Module]:
        mods = {"vae": self.vae}
        if self.conditioner.text_encoder is not None:
            mods["text_encoder"] = self.conditioner.text_encoder
        return mods

    @torch.no_grad()
    def frozen(self, batch: dict, step: int) -> dict:
        idx = batch["index"]
        p = self.cfg.data.caption_dropout
        drop = keyed_rand(self.seed, step, idx, "dropout") < p if p > 0 else None
        x0 = self.vae.encode(batch["pixels"].to(self.device, non_blocking=True))
        cond = self.conditioner(batch.get("captions"), batch.get("labels"), drop)
        return {**batch, "x0": x0, "cond": cond}

    def prepare(self, batch: dict, step: int) -> dict:
        x0, idx = batch["x0"], batch["index"]
        eps = keyed_randn(self.seed, step, idx, x0.shape[1:], "noise").to(x0)
        t = self.diffusion.t_from_uniform(keyed_rand(self.seed, step, idx, "t", torch.float64)).to(x0)
        x_t = self.diffusion.add_noise(x0, eps, t)
        return {"x0": x0, "eps": eps, "t": t, "x_t": x_t, "cond": batch["cond"], "weight": None}

    def forward(self, model: nn.Module, prep: dict) -> torch.Tensor:
        return model(prep["x_t"], prep["t"], prep["cond"])

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.diffusion.loss(pred.float(), prep["x0"], prep["eps"], prep["t"], prep["weight"])
        return per.mean(), per.detach()
