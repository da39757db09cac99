"""Training metrics: accumulated as device tensors (no host sync per step), reduced over the
data-parallel ranks once per log interval, shown on a rank-0 progress bar and written to tensorboard.

Scalars: loss, loss binned by t (guided-diffusion's quartile logging, here 10 bins), grad norm, lr,
samples/s and the step time split into data / forward-backward / optimizer.
"""
from __future__ import annotations

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
        self._reset()

    def _reset(self):
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.bin_sum, self.bin_cnt = z(T_BINS), z(T_BINS)
        self.gnorm_sum = z(1)
        self.times = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}
        self.steps = 0
        self.t_start = time.perf_counter()

    def add_samples(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        b = (t.detach().double().clamp(0, 1 - 1e-9) * T_BINS).long()
        self.bin_sum.scatter_add_(0, b, per_sample.double())
        self.bin_cnt.scatter_add_(0, b, torch.ones_like(per_sample, dtype=torch.float64))

    def add_step(self, gnorm: torch.Tensor, fwd_bwd: float, optim: float) -> None:
        self.gnorm_sum += gnorm.detach().double()
        self.times["fwd_bwd"] += fwd_bwd
        self.times["optim"] += optim
        self.steps += 1

    def add_data_time(self, seconds: float) -> None:
        self.times["data"] += seconds

    def log(self, step: int, lr: float, batch_size: int, data_counts: dict | None = None) -> dict:
        """Collective over the dp ranks: one all-reduce and one host sync per interval (plus, with
        ``data_counts`` (this rank's running totals: good samples, skips per reason), one
        all_gather_object to sum them: ``data/good``, ``data/skipped/<reason>``)."""
        packed = torch.cat([self.bin_sum, self.bin_cnt])
        dist.all_reduce(packed, group=self.group)
        bins, cnt = packed[:T_BINS].tolist(), packed[T_BINS:].tolist()
        gnorm = self.gnorm_sum.item() / max(1, self.steps)
        wall = time.perf_counter() - self.t_start
        n = max(1, self.steps)
        out = {
            "loss": sum(bins) / max(1.0, sum(cnt)),
            "grad_norm": gnorm,
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
            self.bar.set_postfix(loss=f"{out['loss']:.4f}", gnorm=f"{gnorm:.3f}", sps=f"{out['samples_per_s']:.0f}")
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
