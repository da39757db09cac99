"""Validation during training: a Trainer callback on the held-out split (``eval.*`` config keys).

Every ``eval.every`` steps, with the EMA weights swapped in, on every rank:

* **Samples and their scores.** ``eval.num`` samples from fixed seeds (sample ``i``'s noise keyed by
  (``eval.seed``, ``i``)), conditioned on the held-out captions / labels as ``difftrain eval`` does, split
  evenly over the data-parallel ranks (each rank runs the same number of forward passes, as FSDP needs).
  Their features are gathered to rank 0, which logs ``eval/fid``, ``eval/kid``, ``eval/precision``,
  ``eval/recall`` and, with a classifier extractor and labelled data, ``eval/class_acc`` against the
  reference set (the first ``eval.num`` held-out images, featurised once and cached), plus an image grid
  ``eval/samples``.
* **Straightness** (Liu et al. 2022) of the sampling ODE along the first (up to 64) samples' trajectories per
  rank: ``eval/straightness``, which reflow should drive toward 0 (``straightness.py``).
* **Held-out loss binned by t.** The first ``eval.loss_samples`` held-out images, noised at the midpoint of
  each of the training metrics' t bins with fixed keyed noise, no condition dropout: ``eval/loss`` and
  ``eval/loss_by_t/<bin>``. The same samples, noise and t every time, so the curve moves only with the model.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from difftrain.config import ConfigError
from difftrain.train.supervise import alone, point



def eval_sampling(trainer):
    """``eval.steps`` / ``eval.sampler`` / ``eval.guidance``, each unset (0, "", < 0) taken from the stage's own
    sampling (``Stage.sampling``: a student is validated at the step count it was trained for)."""
    from difftrain.train.stages.base import SamplingDefaults

    ec, how = trainer.cfg.eval, trainer.sampling()
    return SamplingDefaults(ec.sampler or how.sampler, ec.steps or how.steps,
                            how.guidance if ec.guidance < 0 else ec.guidance)

class Validation:
    def __init__(self):
        self.ready = False

    def on_step_end(self, trainer, step: int) -> None:
        ec = trainer.cfg.eval
        if not ec.every or step % ec.every:
            return
        if not self.ready:
            self._setup(trainer)
        group = trainer.metrics.group
        with trainer.engine.ema_swapped_in():
            local, images = self._sample(trainer)
            losses = self._loss(trainer) if ec.loss_samples else {}
            losses["eval/straightness"] = self._straightness(trainer)
        parts = {}
        for k, v in local.items():  # equal shapes on every rank
            every = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
            dist.all_gather(every, v.contiguous(), group=group)
            parts[k] = torch.cat(every)[: ec.num].cpu()
        if trainer.rank == 0:
            from difftrain.eval.evaluate import score
            from difftrain.sampling import grid

            parts["wanted"] = self.wanted
            with alone():  # the other ranks wait for this in their next step
                values = {f"eval/{k}": v for k, v in score(self.ref, parts,
                                                           kid_subset_size=min(1000, ec.num, self.n_ref)).items()}
                trainer.metrics.add_scalars({**values, **losses}, step)
                trainer.metrics.add_image("eval/samples", grid(images[:64]), step)

    # ------------------------------------------------------------------------------------------
    def _setup(self, trainer) -> None:
        from difftrain.eval.evaluate import conditions
        from difftrain.eval.extractors import build_extractor
        from difftrain.eval.reference import read_reference, reference_features

        cfg, ec = trainer.cfg, trainer.cfg.eval
        if cfg.model.frames > 0:
            raise ConfigError("config key 'eval.every': validation scores image models; set eval.every=0 for video")
        self.size = trainer.acfg.image_size * trainer.vae.downsample_factor
        self.channels = cfg.data.channels
        for turn in (0, 1):  # rank 0 trains / reads and caches first; then the others load the cache
            if (trainer.rank == 0) == (turn == 0):
                with alone() if turn == 0 else contextlib.nullcontext():  # the others wait in the barrier
                    self.extractor = build_extractor(ec.extractor, device=trainer.device)
                    self.ref = reference_features(ec.ref, self.extractor, ec.num, self.size, self.channels,
                                                  progress=trainer.rank == 0 and cfg.run.progress)
            dist.barrier()
        self.n_ref = len(self.ref["captions"])
        W, r = trainer.dp, trainer.dp_rank
        self.per = math.ceil(ec.num / W)
        self.lo = r * self.per
        self.cond = conditions(cfg.model.cond, cfg.model.num_classes, self.ref, self.per, self.lo)
        self.wanted = conditions(cfg.model.cond, cfg.model.num_classes, self.ref, ec.num)[2]
        self.val = None
        if ec.loss_samples:
            val = read_reference(ec.ref, ec.loss_samples, cfg.data.image_size, self.channels)
            n = len(val["captions"])
            per = math.ceil(n / W)
            idx = [(r * per + i) % n for i in range(per)]  # wrapped: padding rows get weight 0
            keep = torch.tensor([r * per + i < n for i in range(per)], dtype=torch.float64)
            self.val = {"pixels": val["images"][idx].permute(0, 3, 1, 2), "captions": [val["captions"][i] for i in idx],
                        "labels": val["labels"][idx], "index": torch.tensor(idx), "keep": keep}
        self.ready = True

    def _sample(self, trainer):
        from difftrain.eval.evaluate import sample_features_of
        from difftrain.sampling import generate, sample_shape

        cfg, ec = trainer.cfg, trainer.cfg.eval
        captions, labels, _ = self.cond
        how = eval_sampling(trainer)
        images = generate(trainer.served_model(), trainer.diffusion, trainer.conditioner, trainer.vae, n=self.per,
                          shape=sample_shape(trainer.acfg), steps=how.steps, sampler=how.sampler, guidance=how.guidance,
                          seed=ec.seed, device=trainer.device, captions=captions, labels=labels, start=self.lo)
        feats = sample_features_of(self.extractor, images, captions)
        return {k: v.to(trainer.device) for k, v in feats.items()}, images

    def _straightness(self, trainer, most: int = 64) -> float:
        """Mean straightness (Liu et al. 2022) of the sampling ODE over this rank's first ``most`` samples'
        trajectories (``eval.steps`` Euler steps), averaged over the data-parallel ranks."""
        from difftrain.eval.straightness import model_straightness
        from difftrain.sampling import sample_shape

        cfg, ec = trainer.cfg, trainer.cfg.eval
        m = min(most, self.per)
        captions, labels, _ = self.cond
        how = eval_sampling(trainer)
        s = model_straightness(trainer.served_model(), trainer.diffusion, trainer.conditioner, n=m,
                               shape=sample_shape(trainer.acfg), steps=how.steps, guidance=how.guidance, seed=ec.seed,
                               device=trainer.device, captions=captions[:m] if captions is not None else None,
                               labels=labels[:m] if labels is not None else None, start=self.lo)
        total = torch.stack([s.double().sum(), torch.tensor(float(m), dtype=torch.float64, device=s.device)])
        dist.all_reduce(total, group=trainer.metrics.group)
        return float(total[0] / total[1])

    @torch.no_grad()
    def _loss(self, trainer) -> dict:
        from difftrain.data.images import to_unit
        from difftrain.diffusion.keyed import keyed_randn
        from difftrain.train.metrics import T_BINS

        v, dev = self.val, trainer.device
        x0 = trainer.vae.encode(to_unit(v["pixels"].to(dev)))
        cond = trainer.conditioner(v["captions"], v["labels"])
        eps = keyed_randn(trainer.cfg.eval.seed, 0, v["index"], x0.shape[1:], "noise").to(x0)
        sums = torch.zeros(2 * T_BINS, dtype=torch.float64, device=dev)
        keep = v["keep"].to(dev)
        for b in range(T_BINS):
            point()
            t = torch.full((len(x0),), (b + 0.5) / T_BINS, device=dev)
            pred = trainer.served_model()(trainer.diffusion.add_noise(x0, eps, t), t, cond)
            per = trainer.diffusion.loss(pred.float(), x0, eps, t).double()
            sums[b], sums[T_BINS + b] = (per * keep).sum(), keep.sum()
        dist.all_reduce(sums, group=trainer.metrics.group)
        loss = (sums[:T_BINS] / sums[T_BINS:]).tolist()
        out = {f"eval/loss_by_t/{b / T_BINS:.1f}-{(b + 1) / T_BINS:.1f}": x for b, x in enumerate(loss)}
        return {"eval/loss": sum(loss) / T_BINS, **out}
