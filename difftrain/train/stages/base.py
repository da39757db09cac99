"""Stage: the unit of pluggability. One Trainer, engine and checkpoint format runs every stage.

A step is split so a pipeline scheduler can move the frozen part into bubbles (DiffusionPipe):

    frozen(batch)   no-grad work: encode images (VAE) and captions, teacher outputs
    prepare(batch)  draw t and noise (keyed by seed, step, sample index), noise assignment, weights
    forward(model)  the trainable backbone
    loss(pred)      per-sample loss and its scalar mean

Stages name their trainable and frozen modules; frozen modules run under no_grad with no
optimizer state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class FrozenPiece:
    """Part of a stage's ``frozen`` work done by one frozen module, for a pipeline to place (and hold) apart from
    the rest: ``fn(batch)`` returns the ``provides`` keys of ``frozen``'s output (``"x0"``: a tensor, ``"cond"``: the
    cond dict); ``module`` holds its weights (None: no weights worth placing apart)."""
    name: str
    fn: Callable[[dict], dict]
    module: nn.Module | None
    provides: tuple[str, ...]


class Stage(ABC):
    name: str = ""

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}

    @abstractmethod
    def frozen(self, batch: dict, step: int) -> dict: ...

    def frozen_pieces(self, step: int) -> list[FrozenPiece]:
        """``frozen`` split by module (DiffusionPipe places and partitions them apart). Default: one piece."""
        return [FrozenPiece("frozen", lambda b: self.frozen(b, step), None, ("x0", "cond"))]

    @abstractmethod
    def prepare(self, batch: dict, step: int) -> dict: ...

    @abstractmethod
    def forward(self, model: nn.Module, prep: dict) -> torch.Tensor: ...

    @abstractmethod
    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scalar loss to backpropagate, detached per-sample loss [B])."""
