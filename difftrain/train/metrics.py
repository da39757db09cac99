"""Training metrics: accumulated as device tensors (no host sync per step), reduced over the
data-parallel ranks once per log interval, shown on a rank-0 progress bar and written to tensorboard.

Scalars: loss, loss binned by t (guided-diffusion's quartile logging, here 10 bins), grad norm, lr,
samples/s, the step time split into data / forward-backward / optimizer, and ``skipped_steps``: steps whose loss or
gradients were non-finite and were not applied (train/engine.py). A skipped step's losses and grad norm are left
out of the averages; the count of consecutive skipped steps and the recent batches' sample keys are kept for
``Trainer.check_health``.
"""
from __future__ import annotations

import collections
import time
from pathlib import Path

import torch
import torch.distributed as dist

T_BINS = 10


class Metrics:
    def __init__(self, run_dir: Path, rank: int, dp_mesh, device: torch.device, run_cfg, start_step: int):
        self.rank, self.device, self.group = rank, device, dp_mesh.get_group()
        self.writer = self.bar = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            if run_cfg.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=run_cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
        self._last_step = start_step
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # consecutive skipped steps, up to now
        # (step, sample keys, this rank's loss finite, streak after it) of the recent steps: the checks run at least
        # every log step, so a run of bad steps that reached the limit is seen even when the steps after it are good
        self.recent: collections.deque = collections.deque(maxlen=max(1, run_cfg.log_every))
        self._reset()

    def _reset(self):
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.bin_sum, self.bin_cnt = z(T_BINS), z(T_BINS)
        self.pend_sum, self.pend_cnt = z(T_BINS), z(T_BINS)  # this step's samples, added once the step is applied
        self.gnorm_sum = z(1)
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self.times = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}
        self.steps = 0
        self.t_start = time.perf_counter()

    def add_samples(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        b = (t.detach().double().clamp(0, 1 - 1e-9) * T_BINS).long()
        self.pend_sum.scatter_add_(0, b, per_sample.detach().double())
        self.pend_cnt.scatter_add_(0, b, torch.ones_like(per_sample, dtype=torch.float64))

    def add_step(self, gnorm: torch.Tensor, ok: torch.Tensor, fwd_bwd: float, optim: float, step: int = 0,
                 keys=None, loss_ok: torch.Tensor | None = None) -> None:
        """One step done: ``ok`` (device bool, agreed by every rank) whether it was applied. ``step`` (the step's
        number, counted from 1), ``keys`` (its batch's sample keys on this rank) and ``loss_ok`` (whether this
        rank's loss was finite) are kept for the error that names a run of bad steps."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.bin_sum += torch.where(ok, self.pend_sum, zero)
        self.bin_cnt += torch.where(ok, self.pend_cnt, zero)
        self.pend_sum.zero_()
        self.pend_cnt.zero_()
        self.gnorm_sum += torch.where(ok, gnorm.detach().double(), zero)
        self.skipped += ~ok
        self.streak = torch.where(ok, 0, self.streak + 1)
        self.recent.append((step, list(keys) if keys is not None else [], loss_ok, self.streak))
        self.times["fwd_bwd"] += fwd_bwd
        self.times["optim"] += optim
        self.steps += 1

    def limit_reached(self, limit: int) -> int | None:
        """The first recent step that ended ``limit`` consecutive skipped steps, or None (one host sync: log and
        checkpoint steps only). The same on every rank: the skip decision is agreed."""
        if not self.recent:
            return None
        streaks = torch.stack([r[3] for r in self.recent]).tolist()
        return next((r[0] for r, n in zip(self.recent, streaks) if n >= limit), None)

    def batch_of(self, step: int) -> tuple[list, bool]:
        """This rank's sample keys of ``step`` and whether its own loss was finite there (a host sync)."""
        for s, keys, loss_ok, _ in self.recent:
            if s == step:
                return keys, bool(loss_ok) if loss_ok is not None else True
        return [], True

    def add_data_time(self, seconds: float) -> None:
        self.times["data"] += seconds

    def log(self, step: int, lr: float, batch_size: int, data_counts: dict | None = None) -> dict:
        """Collective over the dp ranks: one all-reduce and one host sync per interval (plus, with
        ``data_counts`` (this rank's running totals: good samples, skips per reason), one
        all_gather_object to sum them: ``data/good``, ``data/skipped/<reason>``)."""
        packed = torch.cat([self.bin_sum, self.bin_cnt])
        dist.all_reduce(packed, group=self.group)
        bins, cnt = packed[:T_BINS].tolist(), packed[T_BINS:].tolist()
        gnorm_sum, skipped = torch.cat([self.gnorm_sum, self.skipped.double().reshape(1)]).tolist()
        skipped = int(skipped)
        gnorm = gnorm_sum / max(1, self.steps - skipped)
        wall = time.perf_counter() - self.t_start
        n = max(1, self.steps)
        out = {
            "loss": sum(bins) / max(1.0, sum(cnt)),
            "grad_norm": gnorm,
            "skipped_steps": skipped,
            "lr": lr,
            "samples_per_s": batch_size * n / max(wall, 1e-9),
            **{f"time/{k}": v / n for k, v in self.times.items()},
        }
        out.update({f"loss_by_t/{i / T_BINS:.1f}-{(i + 1) / T_BINS:.1f}": s / c
                    for i, (s, c) in enumerate(zip(bins, cnt)) if c > 0})
        if data_counts is not None:
            every = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(every, data_counts, group=self.group)
            for counts in every:
                for k, v in counts.items():
                    out[f"data/{k}"] = out.get(f"data/{k}", 0) + v
        if self.writer is not None:
            for k, v in out.items():
                self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(step - self._last_step)
            self.bar.set_postfix(loss=f"{out['loss']:.4f}", gnorm=f"{gnorm:.3f}", sps=f"{out['samples_per_s']:.0f}",
                                 **({"skipped": skipped} if skipped else {}))
        self._last_step = step
        self._reset()
        return out

    def add_scalars(self, values: dict, step: int) -> None:
        """Rank 0: scalars computed elsewhere (validation) to tensorboard, and a line under the progress bar."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            text = f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items() if "/loss_by_t" not in k)
            (self.bar.write if self.bar is not None else print)(text)

    def add_image(self, tag: str, grid_hwc, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
