"""Segment boundaries by dynamic programming over per-block costs (DiffusionPipe, Tian et al. 2024, sec. 4.1).

In a synchronous pipeline (GPipe, 1F1B) with M micro-batches the iteration takes about
``sum_s t_s + (M - 1) max_s t_s`` (Narayanan et al. 2021, eq. 1 generalised to uneven segments), where ``t_s`` is
segment s's per-micro-batch forward + backward time including what it sends and its share of frozen work. The
first term is fixed by the blocks (plus the communication of the chosen cuts), so the plan minimises the bottleneck
``max_s t_s`` and, among equal bottlenecks, the total: the classic linear-partition DP, O(S n^2).
"""
from __future__ import annotations

from typing import Sequence


def segment_times(block_times: Sequence[float], bounds: Sequence[tuple[int, int]],
                  cut_times: Sequence[float] | None = None,
                  segment_extra: Sequence[float] | None = None) -> list[float]:
    """Per-micro-batch time of each segment: its blocks, the transfer of its output (``cut_times[hi - 1]``, the
    cost of cutting after that block) and ``segment_extra[s]`` (e.g. frozen work charged to that segment)."""
    n = len(block_times)
    out = []
    for s, (lo, hi) in enumerate(bounds):
        t = sum(block_times[lo:hi])
        if cut_times is not None and hi < n:
            t += cut_times[hi - 1]
        if segment_extra is not None:
            t += segment_extra[s]
        out.append(t)
    return out


def uniform_bounds(n_blocks: int, n_segments: int) -> list[tuple[int, int]]:
    """Equal block counts (the first segments take one more when it does not divide): the baseline."""
    if not 1 <= n_segments <= n_blocks:
        raise ValueError(f"cannot cut {n_blocks} blocks into {n_segments} segments")
    q, r = divmod(n_blocks, n_segments)
    bounds, lo = [], 0
    for s in range(n_segments):
        hi = lo + q + (s < r)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def partition(block_times: Sequence[float], n_segments: int, cut_times: Sequence[float] | None = None,
              segment_extra: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous ``(lo, hi)`` block ranges, one per segment, minimising the slowest segment (then the sum)."""
    n = len(block_times)
    if not 1 <= n_segments <= n:
        raise ValueError(f"cannot cut {n} blocks into {n_segments} segments")
    if cut_times is not None and len(cut_times) < n - 1:
        raise ValueError(f"cut_times needs {n - 1} entries (one per possible cut), got {len(cut_times)}")
    extra = list(segment_extra) if segment_extra is not None else [0.0] * n_segments
    prefix = [0.0]
    for t in block_times:
        prefix.append(prefix[-1] + t)

    def cost(s: int, lo: int, hi: int) -> float:
        c = prefix[hi] - prefix[lo] + extra[s]
        if cut_times is not None and hi < n:
            c += cut_times[hi - 1]
        return c

    inf = (float("inf"), float("inf"))
    # best[s][i] = (bottleneck, total) of cutting blocks [0, i) into segments 0..s; arg[s][i] = start of segment s
    best = [[inf] * (n + 1) for _ in range(n_segments)]
    arg = [[0] * (n + 1) for _ in range(n_segments)]
    for i in range(1, n + 1):
        c = cost(0, 0, i)
        best[0][i] = (c, c)
    for s in range(1, n_segments):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                prev = best[s - 1][j]
                c = cost(s, j, i)
                cand = (max(prev[0], c), prev[1] + c)
                if cand < best[s][i]:
                    best[s][i], arg[s][i] = cand, j
    bounds, hi = [], n
    for s in range(n_segments - 1, -1, -1):
        lo = arg[s][hi] if s > 0 else 0
        bounds.append((lo, hi))
        hi = lo
    return bounds[::-1]
