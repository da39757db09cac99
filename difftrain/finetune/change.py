"""The model-change protocol (config key ``adapt``, ``finetune/adapt.py``): what LoRA, adapters, ControlNet and QAT
implement."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod

from torch import nn

from difftrain.config import ConfigError


class Change(ABC):
    kind: str = ""
    args_class: type | None = None
    mergeable = True  # False: merge leaves the change's modules in the served model (a ControlNet branch)
    reads_control = False  # True: the change reads a control image, ``cond["control"]`` (data.control)

    def __init__(self, args, index: int = 0):
        self.args, self.index = args, index
        self.key = f"adapt[{index}]"  # its config key, named in errors

    def export_refusal(self) -> str | None:
        """Why ``difftrain export`` cannot write the served model with this change, or None (it can)."""
        return None

    def context(self, cfg) -> None:
        """Read the run's facts the change needs beside its own settings (``changes_of`` calls it with the run's
        config; a UNet ControlNet reads the data's channels and the VAE's factor). Default: nothing."""

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

    # ---------------------------------------------------------------- shared checks of the changes' settings
    def chosen_layers(self, names: list[str], groups: dict[str, str], what: str) -> list[str]:
        """The layers of ``names`` that the ``targets`` setting chooses, in ``names`` order: each target a group of
        ``groups`` (a regex) or a regular expression over whole names (``re.fullmatch``, as peft matches), each
        checked to match at least one (``what``: the layers' kind, for the error)."""
        chosen = set()
        for t in self.args.targets:
            rx = groups.get(t, t)
            try:
                hits = {n for n in names if re.fullmatch(rx, n)}
            except re.error as e:
                raise ConfigError(f"config key '{self.key}.targets': {t!r} is not a group ({', '.join(groups)}) or "
                                  f"a valid regular expression ({e})") from None
            if not hits:
                raise ConfigError(f"config key '{self.key}.targets': {t!r} matches no {what} of the model "
                                  f"(groups: {', '.join(groups)}; or a regex over names such as {names[:2]})")
            chosen |= hits
        return [n for n in names if n in chosen]

    def block_indices(self, depth: int) -> list[int]:
        """The ``blocks`` setting (block indices; empty: the first half of the ``depth`` blocks), checked, sorted."""
        blocks = self.args.blocks or list(range((depth + 1) // 2))
        for b in blocks:
            if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < depth:
                raise ConfigError(f"config key '{self.key}.blocks': {b!r} is not a block index of the model "
                                  f"(0..{depth - 1})")
        return sorted(set(blocks))
