"""The conditioner: captions / class labels -> the model's ``cond`` dict, with keyed dropout to the null condition
(classifier-free guidance). Shared by training stages, sampling, validation and evaluation."""
from __future__ import annotations

import torch
from torch import nn

from difftrain.config import ConfigError, ModelConfig


class Conditioner:
    """Turns a batch's captions / labels into the model's ``cond`` dict, with keyed dropout to the
    null condition for classifier-free guidance. Shared by training and sampling.

    The text null condition is one tensor pair everywhere: the encoding of ``""`` on its own
    (``TextEncoder.null_states``), or ``null_text`` = ``(states [L, D], mask [L])`` stored with
    pre-encoded shards (``latents.load_latent_data``), which is the same encoding; so a run on
    latent shards needs no text encoder. Dropped rows take it by ``torch.where`` (no host sync).

    ``guidance_input``: the model takes the CFG scale as an input (an architecture built with ``guidance_embed``:
    a guidance-distilled student): every cond dict carries ``guidance`` [B], 1.0 (unguided) unless the sampler sets
    its own (``sampling.sample_model_space``)."""

    def __init__(self, mc: ModelConfig, text_encoder: nn.Module | None, device: torch.device,
                 null_text: tuple[torch.Tensor, torch.Tensor] | None = None, guidance_input: bool = False):
        self.kind = mc.cond
        self.guidance_input = guidance_input
        self.num_classes = mc.num_classes
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
    def __call__(self, captions: list[str] | None, labels: torch.Tensor | None, drop: torch.Tensor | None = None,
                 text: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """``drop``: bool [B], True = use the null condition. ``text``: pre-encoded ``(states [B, L, D], mask [B, L])``
        used instead of encoding ``captions``."""
        cond = self._cond(captions, labels, drop, text)
        if self.guidance_input and cond:
            n = len(next(iter(cond.values())))
            cond["guidance"] = torch.ones(n, device=self.device)
        return cond

    @torch.no_grad()
    def _cond(self, captions, labels, drop, text) -> dict:
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
            null = {"text_states": states.expand(n, -1, -1), "text_mask": mask.expand(n, -1)}
            if self.guidance_input:
                null["guidance"] = torch.ones(n, device=self.device)
            return null
        return self(None, torch.full((n,), self.num_classes), torch.ones(n, dtype=torch.bool))
