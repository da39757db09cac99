"""Noise assignment: pair each training sample with a nearby noise draw before noising it.

*Immiscible diffusion* (Li et al. 2024, "Immiscible Diffusion: Accelerating Diffusion Training with Noise
Assignment", arXiv 2406.12303): draw the batch's noises as usual, then permute them so that the total
L2 distance between each sample ``x0_i`` and the noise it gets is minimal -- a linear assignment problem on
``C_ij = ||x0_i - eps_j||_2`` (flattened samples). Only the noise rows move, so the noise marginal is unchanged;
the (data, condition) pairs and the timesteps are never touched.

The KNN variant (arXiv 2505.18521, "Improved Immiscible Diffusion"): draw ``k`` candidate noises per sample and
keep the nearest one. No cross-sample coupling, so it is cheaper and naturally independent of how the batch
is split over ranks; it slightly skews the noise marginal toward the data.

Scopes of the linear assignment (``diffusion.assign_scope``):

* ``rank``: each data-parallel rank solves its own (micro-)batch. Cheap; the result depends on the split.
* ``global``: the (micro-)batch is all-gathered over the data-parallel group, solved once (on the group's
  rank 0, whose permutation is broadcast, so all ranks agree bit for bit), and every rank keeps the noise of
  its own slice. The keyed noise (``keyed.keyed_randn``) depends only on the global sample index, so this
  equals a single process assigning the gathered batch (rank order). It is computed per ``prepare`` call, i.e.
  per micro-batch under gradient accumulation.

Distances: on an accelerator they are computed in fp16 with both tensors pre-scaled by 0.1 (as the reference
does: squared norms of large latents overflow fp16 otherwise); the positive scale does not change the
assignment. On the CPU fp16 ``cdist`` is slow or unsupported, so distances are float32 there.

Complexity (B = samples assigned together -- the global micro-batch for ``global`` -- D = numel per sample):
cost matrix O(B^2 D) on the device; Hungarian solve O(B^3) on the host CPU, single-threaded (scipy), the
dominant term for large B; ``global`` adds an all-gather of 2 B D elements per rank and a broadcast of B
indices. KNN: O(k B D) distances plus k - 1 extra keyed normal draws per sample on the CPU generator (for
large D the draws dominate).
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from difftrain.diffusion.keyed import keyed_randn

FP16_PRESCALE = 0.1


@torch.no_grad()
def cost_matrix(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``C[i, j] = ||x0_i - eps_j||_2`` over flattened samples, [B, B] float32 on x0's device."""
    x, e = x0.flatten(1), eps.flatten(1).to(x0.device)
    if x.device.type == "cpu":
        return torch.cdist(x.float(), e.float())
    s = FP16_PRESCALE
    return torch.cdist((x.float() * s).half(), (e.float() * s).half()).float() / s


def solve(cost: torch.Tensor) -> torch.Tensor:
    """The optimal assignment of a square cost matrix: ``perm`` [B] (long, CPU) with sample i -> noise perm[i],
    minimising ``sum_i cost[i, perm[i]]`` (scipy's ``linear_sum_assignment``, O(B^3))."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def hungarian_permutation(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``perm`` [B] such that ``eps[perm]`` is the assignment of the noise rows to the samples of minimal total
    L2 distance."""
    if x0.shape[0] != eps.shape[0]:
        raise ValueError(f"x0 has {x0.shape[0]} samples but eps {eps.shape[0]}")
    if x0.shape[0] <= 1:
        return torch.arange(x0.shape[0])
    return solve(cost_matrix(x0, eps))


def _all_gather(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    m = max(sizes)
    pad = t if t.shape[0] == m else torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))])
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad.contiguous(), group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


@torch.no_grad()
def linear_assign(x0: torch.Tensor, eps: torch.Tensor, *, group=None) -> torch.Tensor:
    """The noise rows permuted so that sample i gets ``eps[perm[i]]`` (Hungarian, total L2 distance minimal).

    ``group=None``: this process's batch only. A process group: the batch gathered over it (rank order) is
    assigned as one, and this rank's slice of the permuted gathered noise is returned (the global scope)."""
    if group is None or dist.get_world_size(group) == 1:
        return eps[hungarian_permutation(x0, eps).to(eps.device)]
    world, me = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([x0.shape[0]], dtype=torch.long, device=x0.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c.item()) for c in counts]
    xs, es = _all_gather(x0, sizes, group), _all_gather(eps.to(x0.device), sizes, group)
    perm = torch.empty(sum(sizes), dtype=torch.long, device=x0.device)
    if me == 0:  # one solver, so every rank gets the same permutation whatever its float rounding
        perm.copy_(hungarian_permutation(xs, es))
    dist.broadcast(perm, group=group, group_src=0)
    off = sum(sizes[:me])
    return es[perm[off:off + sizes[me]]].to(eps.device)


@torch.no_grad()
def knn_select(x0: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """From ``candidates`` [B, k, *shape] keep per sample the one nearest (L2) to ``x0`` [B, *shape]; [B, *shape].
    Ties go to the lower candidate index; with k = 1 this is ``candidates[:, 0]``."""
    if candidates.shape[1] == 1:
        return candidates[:, 0]
    d = (x0.float().flatten(1)[:, None] - candidates.float().flatten(2)).norm(dim=2)  # [B, k]
    best = d.argmin(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]


def _knn_seed(seed: int, j: int) -> int:
    """Run seed of the j-th extra KNN candidate stream (j >= 1); never repeats another stream's draws."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:knn:{j}".encode(), digest_size=8).digest(), "little") >> 1


def knn_candidates(eps: torch.Tensor, seed: int, step: int, index, k: int) -> torch.Tensor:
    """[B, k, *shape]: candidate 0 is ``eps`` (the run's usual keyed noise), candidate j >= 1 is keyed by
    (seed of stream j, step, global sample index), so the candidates do not depend on the world size."""
    cands = [eps] + [keyed_randn(_knn_seed(seed, j), step, index, eps.shape[1:], "noise").to(eps)
                     for j in range(1, k)]
    return torch.stack(cands, dim=1)


class Assigner:
    """Base: ``assigner(x0, eps, step=..., index=...) -> eps`` (rows re-assigned to the samples).

    ``scope``: ``rank`` or ``global``. ``group``: the data-parallel process group for ``global``; None = the
    default group when torch.distributed is initialised, else no distribution."""
    name = "?"

    def __init__(self, *, scope: str = "rank", group=None, k: int = 4, seed: int = 0):
        self.scope, self.k, self.seed = scope, k, seed
        self._group = group

    def group(self):
        if self.scope != "global":
            return None
        if self._group is not None:
            return self._group
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def assign(self, x0: torch.Tensor, eps: torch.Tensor, *, group=None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x0: torch.Tensor, eps: torch.Tensor, *, step: int = 0, index=None) -> torch.Tensor:
        return self.assign(x0, eps, group=self.group())


class NoAssign(Assigner):
    """Identity: the noise is returned as drawn (the same tensor object; training is bitwise unchanged)."""
    name = "none"

    def assign(self, x0, eps, *, group=None):
        return eps


class LinearAssign(Assigner):
    """Immiscible diffusion (Li et al. 2024, arXiv 2406.12303): Hungarian assignment of the batch's noise rows."""
    name = "linear"

    def assign(self, x0, eps, *, group=None):
        return linear_assign(x0, eps, group=group)


class KNNAssign(Assigner):
    """KNN noise selection (arXiv 2505.18521): k keyed candidates per sample, keep the nearest. Per sample, so
    the scope does not matter (the result never depends on the world size)."""
    name = "knn"

    def assign(self, x0, eps, *, group=None, candidates: torch.Tensor | None = None):
        """``candidates`` [B, k, *shape]; without them only ``eps`` is a candidate (identity)."""
        return knn_select(x0, eps[:, None] if candidates is None else candidates)

    def __call__(self, x0, eps, *, step: int = 0, index=None):
        if index is None:
            raise ValueError("knn assignment needs the batch's global sample indices")
        return knn_select(x0, knn_candidates(eps, self.seed, step, index, self.k))


ASSIGNERS = {c.name: c for c in (NoAssign, LinearAssign, KNNAssign)}


def build_assigner(cfg, seed: int = 0, group=None) -> Assigner:
    """From a ``difftrain.config.DiffusionConfig`` (``assign``, ``assign_scope``, ``assign_k``)."""
    from difftrain.config import ConfigError

    if cfg.assign not in ASSIGNERS:
        raise ConfigError(f"config key 'diffusion.assign' = {cfg.assign!r} is not one of: {', '.join(ASSIGNERS)}")
    if cfg.assign_scope not in ("rank", "global"):
        raise ConfigError(f"config key 'diffusion.assign_scope' = {cfg.assign_scope!r} is not one of: rank, global")
    if cfg.assign_k < 1:
        raise ConfigError(f"config key 'diffusion.assign_k' must be >= 1, got {cfg.assign_k}")
    return ASSIGNERS[cfg.assign](scope=cfg.assign_scope, group=group, k=cfg.assign_k, seed=seed)
