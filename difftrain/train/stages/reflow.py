"""Reflow and k-step distillation on a teacher's (noise, sample) pairs (Liu et al. 2022, "Flow Straight and Fast",
sec. 2.2-2.3; InstaFlow, Liu et al. 2024).

The pairs are shards written by ``difftrain distill pairs TEACHER`` (difftrain/distill/pairs.py): each sample holds
the teacher ODE's output x^ = Phi(z) as ``latent_mean`` and its starting noise z as ``noise``, read with
``data.kind=latent``. Reflow is rectified-flow training on the fixed coupling: x0 = x^, eps = z (the pair's own noise
replaces the keyed draw), x_t = (1 - t) x0 + t eps, target v = eps - x0; training the 1-RF model's pairs gives 2-RF,
whose ODE is straighter (Liu et al. 2022, Theorem 3.3). ``stage_args.grid = k`` draws t only from the k start points of
the k-step Euler grid (``samplers.time_grid(k, 1, 0)``): k-step distillation, whose student samples with Euler in k
steps; k = 1 is InstaFlow's one-step distillation (x^ = z - v(z, 1)). ``stage_args.loss = pseudo_huber`` uses the
pseudo-Huber distance of RF++ (Lee et al. 2024) instead of the squared error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from difftrain.config import ConfigError, identity
from difftrain.diffusion.diffusion import DISTANCES
from difftrain.diffusion.keyed import keyed_rand
from difftrain.train.stages.base import SamplingDefaults
from difftrain.train.stages.pretrain import PretrainStage



def pairs_guidance(spec) -> float:
    """The CFG scale the pairs of ``data.train`` were generated with (their ``encode_info.json`` pairs block); 1.0
    when it cannot be read (then the run's own ``run.sample_guidance`` stands)."""
    from difftrain.data.latents import read_info

    try:
        info, _ = read_info(spec)
        return float(info.get("pairs", {}).get("guidance", 1.0))
    except (ConfigError, OSError, ValueError, TypeError):
        return 1.0


@dataclass
class ReflowArgs:
    loss: str = identity("l2", tuple(DISTANCES))  # l2 | pseudo_huber (diffusion.DISTANCES)
    grid: int = identity(0, ge=0)  # 0: t from diffusion.density; k > 0: the k-step Euler grid (k-step distillation)


class ReflowStage(PretrainStage):
    name = "reflow"
    args_class = ReflowArgs

    def __init__(self, shared, args: ReflowArgs | None = None):
        super().__init__(shared)
        self.args = args or ReflowArgs()
        if self.args.grid:
            from difftrain.diffusion.samplers import time_grid

            self.starts = time_grid(self.args.grid, 1.0, 0.0)[:-1].double()  # the k Euler steps' start times

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.data.kind != "latent":
            raise ConfigError(f"config key 'data.kind' = '{cfg.data.kind}': stage 'reflow' trains on (noise, sample) "
                              "pair shards, read with data.kind=latent (difftrain distill pairs)")
        if cfg.diffusion.path != "rf":
            raise ConfigError(f"config key 'diffusion.path' = '{cfg.diffusion.path}': stage 'reflow' needs the "
                              "rectified-flow path (rf)")
        if cfg.model.cond != "text" and cfg.data.require_caption:
            raise ConfigError("config key 'data.require_caption' = true: the pairs of a class-conditional or "
                              "unconditional teacher carry no captions; set data.require_caption=false")
        if cfg.diffusion.assign != "none":
            raise ConfigError(f"config key 'diffusion.assign' = '{cfg.diffusion.assign}': stage 'reflow' pairs each "
                              "sample with its own noise (assign=none)")

    @classmethod
    def sampling(cls, cfg) -> SamplingDefaults:
        k = cls.parse_args(cfg).grid
        base = super().sampling(cfg)
        guidance = 1.0 if pairs_guidance(cfg.data.train) != 1.0 else base.guidance  # CFG already in the pairs
        return SamplingDefaults("euler", k, guidance) if k else SamplingDefaults(base.sampler, base.steps, guidance)

    def noise(self, batch: dict, step: int) -> torch.Tensor:
        if "noise" not in batch:
            raise ConfigError("config key 'data.train': stage 'reflow' needs pair shards whose samples hold 'noise' "
                              "(difftrain distill pairs); these have none")
        return batch["noise"].to(batch["x0"])

    def draw_t(self, batch: dict, step: int) -> torch.Tensor:
        if not self.args.grid:
            return super().draw_t(batch, step)
        u = keyed_rand(self.seed, step, batch["index"], "t", torch.float64)
        i = (u * self.args.grid).long().clamp(max=self.args.grid - 1)
        return self.starts[i].to(batch["x0"])

    def loss(self, pred: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.diffusion.loss(pred.float(), prep["x0"], prep["eps"], prep["t"], prep["weight"],
                                  distance=self.args.loss)
        return per.mean(), per.detach()
