"""Stage boundaries by dynamic programming over per-block costs (DiffusionPipe, Tian et al. 2024, sec. 4.1).

In a synchronous pipeline (GPipe, 1F1B) with M micro-batches the iteration takes about
``sum_s t_s + (M - 1) max_s t_s`` (Narayanan et al. 2021, eq. 1 generalised to uneven stages), where ``t_s`` is
stage s's per-micro-batch forward + backward time including what it sends and its share of frozen work. The first
term is fixed by the blocks (plus the communication of the chosen cuts), so the plan minimises the bottleneck
``max_s t_s`` and, among equal bottlenecks, the total: the classic linear-partition DP, O(S n^2).
"""
from __future__ import annotations

from typing import Sequence


def stage_times(block_times: Sequence[float], bounds: Sequence[tuple[int, int]],
                cut_times: Sequence[float] | None = None, stage_extra: Sequence[float] | None = None) -> list[float]:
    """Per-micro-batch time of each stage: its blocks, the transfer of its output (``cut_times[hi - 1]``, the
    cost of cutting after that block) and ``stage_extra[s]`` (e.g. frozen work charged to that stage)."""
    n = len(block_times)
    out = []
    for s, (lo, hi) in enumerate(bounds):
        t = sum(block_times[lo:hi])
        if cut_times is not None and hi < n:
            t += cut_times[hi - 1]
        if stage_extra is not None:
            t += stage_extra[s]
        out.append(t)
    return out


def uniform_bounds(n_blocks: int, n_stages: int) -> list[tuple[int, int]]:
    """Equal block counts (the first stages take one more when it does not divide): the baseline."""
    if not 1 <= n_stages <= n_blocks:
        raise ValueError(f"cannot cut {n_blocks} blocks into {n_stages} stages")
    q, r = divmod(n_blocks, n_stages)
    bounds, lo = [], 0
    for s in range(n_stages):
        hi = lo + q + (s < r)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def partition(block_times: Sequence[float], n_stages: int, cut_times: Sequence[float] | None = None,
              stage_extra: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous ``(lo, hi)`` block ranges, one per stage, minimising the slowest stage (then the sum)."""
    n = len(block_times)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {n_stages} stages")
    if cut_times is not None and len(cut_times) < n - 1:
        raise ValueError(f"cut_times needs {n - 1} entries (one per possible cut), got {len(cut_times)}")
    extra = list(stage_extra) if stage_extra is not None else [0.0] * n_stages
    prefix = [0.0]
    for t in block_times:
        prefix.append(prefix[-1] + t)

    def cost(s: int, lo: int, hi: int) -> float:
        c = prefix[hi] - prefix[lo] + extra[s]
        if cut_times is not None and hi < n:
            c += cut_times[hi - 1]
        return c

    inf = (float("inf"), float("inf"))
    # best[s][i] = (bottleneck, total) of cutting blocks [0, i) into stages 0..s; arg[s][i] = start of stage s
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    arg = [[0] * (n + 1) for _ in range(n_stages)]
    for i in range(1, n + 1):
        c = cost(0, 0, i)
        best[0][i] = (c, c)
    for s in range(1, n_stages):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                prev = best[s - 1][j]
                c = cost(s, j, i)
                cand = (max(prev[0], c), prev[1] + c)
                if cand < best[s][i]:
                    best[s][i], arg[s][i] = cand, j
    bounds, hi = [], n
    for s in range(n_stages - 1, -1, -1):
        lo = arg[s][hi] if s > 0 else 0
        bounds.append((lo, hi))
        hi = lo
    return bounds[::-1]
