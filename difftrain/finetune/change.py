"""The model-change protocol (config key ``adapt``, ``finetune/adapt.py``): what LoRA, adapters, ControlNet and QAT
implement."""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn


class Change(ABC):
    kind: str = ""
    args_class: type | None = None
    mergeable = True  # False: merge leaves the change's modules in the served model (a ControlNet branch)

    def __init__(self, args, index: int = 0):
        self.args = args
        self.key = f"adapt[{index}]"  # its config key, named in errors

    @abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Change ``model`` in place: add this change's parameters (trainable) and freeze the rest it does not
        train."""

    @abstractmethod
    def merge(self, model: nn.Module) -> None:
        """Fold this change into ``model``'s own weights and restore the plain architecture, in place (a change that is
        not ``mergeable`` leaves its modules in place)."""

    @abstractmethod
    def owns(self, name: str) -> bool:
        """Whether parameter ``name`` (a state-dict key of the changed module) is this change's."""
