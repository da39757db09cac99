"""Runs ``difftrain train`` with a test stage that holds a derived module: ``target``, a copy of the backbone moved
by an EMA of decay 0.5 after each applied step (a target network's update), and a count of applied steps as the
stage's own non-tensor state. Usage (under torchrun or alone): derived_job.py CONFIG k=v ..."""
import sys

import torch

from difftrain.train.stages import STAGES
from difftrain.train.stages.base import DERIVED, ModuleSpec
from difftrain.train.stages.pretrain import PretrainStage


class TargetStage(PretrainStage):
    name = "target_test"

    def modules(self):
        mods = super().modules()
        return {**mods, "target": ModuleSpec(DERIVED, meta=mods["backbone"].meta, of="backbone")}

    def __init__(self, shared, args=None):
        super().__init__(shared, args)
        self.updates = 0

    @torch.no_grad()
    def after_step(self, step, ok):
        from difftrain.train.ema import follow

        follow(self.live["target"], self.live["backbone"], 0.5, ok)
        self.updates += int(ok)

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state.get("updates", 0)


if __name__ == "__main__":
    STAGES[TargetStage.name] = TargetStage
    from difftrain.cli import main

    main(["train", *sys.argv[1:]])
