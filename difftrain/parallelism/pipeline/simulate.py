"""Predict a pipelined iteration from a cost profile: time, idle fraction and peak memory per rank, and where the
frozen work goes (DiffusionPipe, Tian et al. 2024, sec. 4.2: fill the bubbles with the *next* iteration's frozen
work, splitting a frozen module over several bubbles by running part of its micro-batch).

One pipeline replica is simulated event by event: a forward waits for the previous segment's output (plus its
transfer when the segments are on different ranks), a backward for the next segment's gradient; each rank runs its
actions in the schedule's order: ``orders.rank_order`` for GPipe and 1F1B (one segment per rank, the order the fill
runtime executes), torch's own orders for interleaved 1F1B and ZB-V (two segments per rank; ZB's backward split
into input- and weight-gradient halves). Frozen work:

* ``inline``: the first segment computes a micro-batch's frozen work right before its forward (the usual trainer);
* ``balanced``: every rank computes 1/S of the iteration's frozen work up front, then the results are gathered
  (the public-API fallback for any schedule);
* ``fill`` (GPipe, 1F1B): the next iteration's frozen work is packed, in sample-sized pieces, into the idle gaps of the
  backbone-only timeline (earliest gap first); what does not fit runs after the rank's last action, spread over
  the ranks that finish first. :func:`fill_plan` is the placement the runtime executes.

Data parallelism (``D`` replicas) adds the gradient all-reduce that is not hidden behind the backward
(bucketed DDP overlaps it with the rank's backward compute).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from difftrain.parallelism.pipeline.costs import Profile
from difftrain.parallelism.pipeline.orders import SIM_SCHEDULES, schedule_orders

MODES = ("inline", "balanced", "fill")
@dataclass
class Event:
    rank: int
    kind: str  # "F" | "B" | "frozen" | "comm"
    start: float
    end: float
    mb: int = -1
    label: str = ""


@dataclass
class Chunk:
    """A piece of frozen work: module ``name`` on samples ``[lo, hi)`` of micro-batch ``mb``."""
    name: str
    mb: int
    lo: int
    hi: int


@dataclass
class SimResult:
    time: float  # iteration time, seconds
    events: list[Event]
    busy: list[float]  # per rank, seconds of compute
    idle: list[float]  # per rank, fraction of the iteration
    memory: list[dict]  # per rank: params, optimizer (incl. grads), activations, frozen, total (bytes)
    ideal: float  # (backbone + frozen work) / S: no bubbles, perfect balance
    placement: dict = field(default_factory=dict)  # fill: {(rank, slot): [Chunk]}; slot k = before action k
    unplaced: float = 0.0  # fill: seconds of frozen work that found no gap

    def summary(self) -> str:
        idle = " ".join(f"{100 * i:.0f}%" for i in self.idle)
        return f"iter {self.time * 1e3:.1f} ms (ideal {self.ideal * 1e3:.1f}), idle per rank {idle}"


def _backbone(seg_f: list[float], seg_b: list[float], comm: list[float], orders: list, pre: list[float],
              extra_f0: float) -> dict:
    """Start/end of every action ``(kind, mb, segment)``; ``pre[r]`` = work before rank r's first action,
    ``extra_f0`` = inline frozen work before each forward of segment 0. A backward split in I and W (ZB) costs half
    of ``seg_b`` each."""
    S, R = len(seg_f), len(orders)
    owner = {seg: r for r, o in enumerate(orders) for _, _, seg in o}
    ends: dict = {}
    starts: dict = {}
    free = list(pre)
    pos = [0] * R

    def hop(a: int, b: int) -> float:  # transfer between neighbouring segments a < b when on different ranks
        return comm[a] if owner[a] != owner[b] else 0.0

    def grad_ready(i: int, seg: int):
        e = ends.get(("B", i, seg), ends.get(("I", i, seg)))
        return None if e is None else e

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(R):
            while pos[r] < len(orders[r]):
                kind, i, seg = orders[r][pos[r]]
                if kind == "F":
                    dep = 0.0 if seg == 0 else ends.get(("F", i, seg - 1))
                    if seg > 0 and dep is not None:
                        dep += hop(seg - 1, seg)
                    dur = seg_f[seg] + (extra_f0 if seg == 0 else 0.0)
                elif kind in ("B", "I"):
                    if seg == S - 1:
                        dep = ends.get(("F", i, seg))
                    else:
                        dep = grad_ready(i, seg + 1)
                        dep = None if dep is None else dep + hop(seg, seg + 1)
                    dur = seg_b[seg] if kind == "B" else seg_b[seg] / 2
                else:  # W: after its own input-gradient pass
                    dep = ends.get(("I", i, seg))
                    dur = seg_b[seg] / 2
                if dep is None:
                    break
                start = max(free[r], dep)
                key = (kind, i, seg)
                starts[key], ends[key] = start, start + dur
                free[r] = start + dur
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked in simulation (inconsistent orders)")
    return {"starts": starts, "ends": ends}


def _peak_activations(order: list, saved: list[float]) -> float:
    """Peak bytes of saved activations on a rank: a forward adds its segment's, a full or weight backward frees."""
    live = peak = 0.0
    for kind, _, seg in order:
        if kind == "F":
            live += saved[seg]
        elif kind in ("B", "W"):
            live -= saved[seg]
        peak = max(peak, live)
    return peak


def simulate(profile: Profile, bounds: Sequence[tuple[int, int]], n_mb: int, schedule: str = "1f1b",
             mode: str = "inline", dp: int = 1, dp_bw: float = float("inf"), bytes_per_param: float = 16.0,
             frozen_bytes_per_param: float = 2.0, fsdp: bool = False, grad_bytes: float = 2.0,
             owners: dict[str, set[int]] | None = None) -> SimResult:
    """One iteration of ``n_mb`` micro-batches (the profile's ``mb_size`` each) through ``bounds`` (one range per
    segment; interleaved 1F1B and ZB-V put two segments on each rank). ``owners`` (fill): module -> the ranks that
    hold its weights and run its pieces (default: any rank)."""
    if mode not in MODES:
        raise ValueError(f"frozen work mode must be one of {', '.join(MODES)}, got {mode!r}")
    S, blocks = len(bounds), profile.blocks
    multi = schedule not in SIM_SCHEDULES
    if multi and mode == "fill":
        raise ValueError(f"bubble filling covers {', '.join(SIM_SCHEDULES)}; {schedule!r} takes inline or balanced")
    if multi and S % 2:
        raise ValueError(f"{schedule} runs two segments per rank: an even number of segments, got {S}")
    R = S // 2 if multi else S
    orders = schedule_orders(schedule, R, n_mb)
    owner = {seg: r for r, o in enumerate(orders) for _, _, seg in o}
    seg_f, seg_b, comm = _segment_times(profile, bounds)
    frozen_mb = profile.frozen_time  # all frozen modules, one micro-batch
    frozen_total = frozen_mb * n_mb
    gather = sum(f.out_bytes for f in profile.frozen) * n_mb / profile.p2p_bw if R > 1 else 0.0
    pre = [0.0] * R
    extra_f0 = 0.0
    if mode == "inline" or R == 1:
        extra_f0 = frozen_mb
    elif mode == "balanced":
        pre = [frozen_total / R + gather] * R
    times = _backbone(seg_f, seg_b, comm, orders, pre, extra_f0)
    starts, ends = times["starts"], times["ends"]
    events: list[Event] = []
    busy = [0.0] * R
    for (kind, i, seg), s in starts.items():
        r, e = owner[seg], ends[(kind, i, seg)]
        shown = "F" if kind == "F" else "B"
        if kind == "F" and seg == 0 and extra_f0:
            events.append(Event(r, "frozen", s, s + extra_f0, i))
            events.append(Event(r, "F", s + extra_f0, e, i, f"segment {seg}"))
        else:
            events.append(Event(r, shown, s, e, i, f"{kind} segment {seg}"))
        busy[r] += e - s
    for r in range(R):
        if pre[r]:
            events.append(Event(r, "frozen", 0.0, pre[r] - gather))
            busy[r] += pre[r] - gather
            if gather:
                events.append(Event(r, "comm", pre[r] - gather, pre[r], label="gather frozen outputs"))
    finish = [max(ends[a] for a in orders[r]) for r in range(R)]
    T = max(finish)
    placement: dict = {}
    unplaced = 0.0
    if mode == "fill" and R > 1:
        placement, unplaced, extra_end = fill_plan(profile, orders, starts, ends, n_mb, T, owners)
        for (r, slot), chunks in placement.items():
            t0 = ends[orders[r][slot - 1]] if slot > 0 else 0.0
            if slot == len(orders[r]):
                t0 = finish[r]
            for c in chunks:
                d = _chunk_time(profile, c)
                events.append(Event(r, "frozen", t0, t0 + d, c.mb, f"{c.name}[{c.lo}:{c.hi}]"))
                t0 += d
                busy[r] += d
        T = max(T, max(finish[r] + extra_end[r] for r in range(R))) + gather
    # data parallelism: the all-reduce (DDP) or reduce-scatter + all-gathers (FSDP) not hidden by the backward
    saved = [sum(b.saved_bytes for b in blocks[lo:hi]) for lo, hi in bounds]
    mem = []
    for r in range(R):
        mine = [seg for seg in range(S) if owner[seg] == r]
        n_params = sum(b.params for seg in mine for b in blocks[bounds[seg][0]:bounds[seg][1]])
        if dp > 1:
            volume = (3 if fsdp else 2) * grad_bytes * n_params * (dp - 1) / dp
            exposed = max(0.0, volume / dp_bw - sum(seg_b[seg] for seg in mine) * n_mb)
            if exposed:
                events.append(Event(r, "comm", T, T + exposed, label="dp gradient sync"))
        if mode == "fill" and R > 1:  # the modules this rank holds (owners) or runs pieces of
            names = ({n for n, rs in owners.items() if r in rs} if owners else
                     {c.name for (rr, _), cs in placement.items() if rr == r for c in cs})
            frozen_here = sum(f.params for f in profile.frozen if f.name in names)
        else:  # inline: the first segment's rank holds them; balanced: every rank runs a share of every module
            frozen_here = sum(f.params for f in profile.frozen) if (r == owner[0] or mode == "balanced") else 0
        m = dict(params=2 * n_params, optimizer=(bytes_per_param - 2) * n_params / (dp if fsdp else 1),
                 activations=_peak_activations(orders[r], saved), frozen=frozen_bytes_per_param * frozen_here)
        if fsdp:
            m["params"] /= dp
        m["total"] = sum(m.values())
        mem.append(m)
    comm_end = max([e.end for e in events if e.label == "dp gradient sync"] or [T])
    T = max(T, comm_end)
    idle = [1 - b / T for b in busy]
    ideal = (profile.backbone_time * n_mb + frozen_total) / R
    return SimResult(T, sorted(events, key=lambda e: (e.rank, e.start)), busy, idle, mem, ideal, placement,
                     unplaced)


def _segment_times(profile: Profile, bounds: Sequence[tuple[int, int]]) -> tuple[list, list, list]:
    """Per segment forward and backward seconds, and the transfer after each segment but the last."""
    blocks = profile.blocks
    seg_f = [sum(b.fwd for b in blocks[lo:hi]) + profile.overhead for lo, hi in bounds]
    seg_b = [sum(b.bwd for b in blocks[lo:hi]) + profile.overhead for lo, hi in bounds]
    return seg_f, seg_b, [profile.comm(hi - 1) for lo, hi in bounds[:-1]]


def current_plan(profile: Profile, bounds: Sequence[tuple[int, int]], n_mb: int, schedule: str = "1f1b",
                 owners: dict[str, set[int]] | None = None) -> dict[int, list[tuple[int, Chunk, bool]]]:
    """Where *this* iteration's frozen work goes when nothing was prefetched (the first step, a resume): each
    micro-batch's frozen work, in whole samples, into the idle gaps of any rank that end before the first segment's
    forward of that micro-batch, earliest gap first; the rest inline on the first segment right before that
    forward. Gaps come from the timeline with all frozen work inline, where every delivery edge (producer's slot
    -> consumer's forward) points forward in time, so adding them cannot create a cycle: the runtime cannot
    deadlock, and moving work off the first segment only makes it earlier (a producer may then be late: a stall,
    not a hang). With ``owners`` (module -> the ranks holding it) a module's pieces go to its owners only, and
    what does not fit a gap of an owner runs before that owner's first action when the first segment does not
    hold the module (an edge from a slot with no predecessor: still acyclic). Returns per rank its
    ``(slot, Chunk, inline)`` pieces in execution order (slot k = before action k of ``rank_order``; inline
    pieces run at the first segment's forward of their micro-batch)."""
    S, mb_size = len(bounds), profile.mb_size
    orders = schedule_orders(schedule, S, n_mb)
    times = _backbone(*_segment_times(profile, bounds), orders, [0.0] * S, profile.frozen_time)
    starts = times["starts"]
    gaps = [[start, start + length, r, k] for start, length, r, k in _gaps(orders, starts, times["ends"])]
    pieces: dict[int, list] = {r: [] for r in range(S)}
    f_slot = {i: k for k, (kind, i, _) in enumerate(orders[0]) if kind == "F"}
    owners = owners or {}
    for i in range(n_mb):
        deadline = starts[("F", i, 0)]
        for f in profile.frozen:
            done = 0
            mine = owners.get(f.name, set(range(S)))
            for g in gaps:
                if done == mb_size:
                    break
                if g[2] not in mine:
                    continue
                room = min(g[1], deadline) - g[0]
                fit = _fit(f, room, mb_size - done, mb_size)
                if room <= 0 or fit <= 0:
                    continue
                pieces[g[2]].append((g[3], Chunk(f.name, i, done, done + fit), False))
                g[0] += f.chunk_seconds(fit, mb_size)
                done += fit
            if done < mb_size and 0 in mine:
                pieces[0].append((f_slot[i], Chunk(f.name, i, done, mb_size), True))
            elif done < mb_size:
                pieces[min(mine)].append((0, Chunk(f.name, i, done, mb_size), False))
    return {r: sorted(p, key=lambda x: (x[0], x[2], x[1].mb)) for r, p in pieces.items()}


def _gaps(orders: list, starts: dict, ends: dict, T: float | None = None) -> list[tuple[float, float, int, int]]:
    """Every rank's idle gaps before its actions (and up to ``T`` after its last), as ``(start, length, rank,
    slot)`` sorted by start; slot k = before the rank's k-th action."""
    gaps = []
    for r, order in enumerate(orders):
        prev = 0.0
        for k, action in enumerate(order):
            if starts[action] - prev > 1e-12:
                gaps.append((prev, starts[action] - prev, r, k))
            prev = ends[action]
        if T is not None and T - prev > 1e-12:
            gaps.append((prev, T - prev, r, len(order)))
    return sorted(gaps)


def _chunk_time(profile: Profile, c: Chunk) -> float:
    f = next(f for f in profile.frozen if f.name == c.name)
    return f.chunk_seconds(c.hi - c.lo, profile.mb_size)


def _fit(f, room: float, left: int, mb_size: int) -> int:
    """How many of ``left`` samples of ``f`` one call can take in ``room`` seconds."""
    per = (f.fwd - f.fixed) / mb_size
    if room < f.fixed + per - 1e-12:
        return 0
    return min(left, int((room - f.fixed) / per + 1e-9)) if per else left


def fill_plan(profile: Profile, orders: list[list[tuple[str, int]]], starts: dict, ends: dict, n_mb: int,
              T: float, owners: dict[str, set[int]] | None = None) -> tuple[dict, float, list[float]]:
    """Pack the next iteration's frozen work (module by module, micro-batch by micro-batch, in whole samples)
    into each rank's idle gaps, earliest gap first; with ``owners`` (module -> the ranks holding its weights) a
    module's pieces go to its owners only. Returns ``{(rank, slot): [Chunk]}`` (slot k = run before the rank's
    k-th action; slot ``len(order)`` = after its last), the seconds left unplaced (then spread over the owners'
    tails) and the extra tail time per rank."""
    S = len(orders)
    owners = owners or {}
    gaps = _gaps(orders, starts, ends, T)
    cost = {f.name: f for f in profile.frozen}
    per_sample = {f.name: (f.fwd - f.fixed) / profile.mb_size for f in profile.frozen}
    work = [(f.name, mb) for f in profile.frozen for mb in range(n_mb)]
    done = {w: 0 for w in work}  # samples of each (module, micro-batch) placed so far
    placement: dict = {}
    first = 0  # work before this index is fully placed
    for start, length, r, slot in gaps:
        room = length
        while first < len(work) and done[work[first]] == profile.mb_size:
            first += 1
        for name, mb in work[first:]:
            left = profile.mb_size - done[(name, mb)]
            if left == 0 or (name in owners and r not in owners[name]):
                continue
            fit = _fit(cost[name], room, left, profile.mb_size)
            if fit <= 0:
                break  # keep the order: the gap is full for this piece
            lo = done[(name, mb)]
            placement.setdefault((r, slot), []).append(Chunk(name, mb, lo, lo + fit))
            room -= cost[name].chunk_seconds(fit, profile.mb_size)
            done[(name, mb)] += fit
    # leftovers: after each rank's last action, module by module, the remaining samples as one contiguous stream
    # cut into a run per (owner) rank sized so that the ranks end level (water filling): frozen work larger than the
    # bubbles, such as a teacher's steps, then ends on every rank at once, as ``balanced`` would spread it, in at
    # most one split call per rank and micro-batch boundary
    tail = [0.0] * S
    finish = []
    for r in range(S):
        finish.append(ends[orders[r][-1]] + sum(_chunk_time(profile, c) for (rr, sl), cs in placement.items()
                                             if rr == r and sl == len(orders[r]) for c in cs))
    unplaced = 0.0
    for f in profile.frozen:
        stream = [(mb, done[(f.name, mb)]) for mb in range(n_mb) if done[(f.name, mb)] < profile.mb_size]
        total = sum(profile.mb_size - lo for _, lo in stream)
        if not total:
            continue
        ranks = sorted(owners.get(f.name, range(S)), key=lambda q: (finish[q] + tail[q], q))
        share = _water_fill([finish[q] + tail[q] for q in ranks], total, per_sample[f.name])
        pos = 0  # position in the stream (samples)
        flat = [(mb, i) for mb, lo in stream for i in range(lo, profile.mb_size)]
        for r, n in zip(ranks, share):
            run = flat[pos:pos + n]
            pos += n
            while run:  # one chunk per micro-batch the run touches
                mb, lo = run[0]
                k = next((j for j, (m, _) in enumerate(run) if m != mb), len(run))
                c = Chunk(f.name, mb, lo, lo + k)
                placement.setdefault((r, len(orders[r])), []).append(c)
                d = _chunk_time(profile, c)
                tail[r] += d
                unplaced += d
                run = run[k:]
    extra_end = [finish[r] + tail[r] - ends[orders[r][-1]] for r in range(S)]
    return placement, unplaced, extra_end


def _water_fill(ends: list[float], total: int, per: float) -> list[int]:
    """Samples per rank (``ends``: when each is free, ascending) so that all end level: ``total`` shared out."""
    if per <= 0:
        return [total] + [0] * (len(ends) - 1)
    k, level = 1, ends[0] + total * per
    while k < len(ends) and ends[k] < level:  # rank k joins once the level passes its end
        k += 1
        level = (sum(ends[:k]) + total * per) / k
    share = [max(0, int((level - e) / per)) if i < k else 0 for i, e in enumerate(ends)]
    for i in range(total - sum(share)):  # rounding: the rest one by one, earliest ranks first
        share[i % k] += 1
    return share


def choose_owners(profile: Profile, bounds: Sequence[tuple[int, int]], n_mb: int, schedule: str = "1f1b",
                  tolerance: float = 0.02, **sim) -> dict[str, set[int]]:
    """Partition the frozen modules across the pp ranks (DiffusionPipe, sec. 4.2: the frozen part is partitioned
    over the devices whose bubbles run it). Each module is held by every rank or by one; modules are taken
    largest first and each is given the single owner that keeps the simulated fill step within ``tolerance`` of
    the best so far and gives the smallest peak memory of any rank (then the fewest frozen copies); replicated if
    none does: ``len(frozen) x S`` simulations (``sim``: ``simulate``'s data-parallel arguments)."""
    S = len(bounds)
    params = {f.name: f.params for f in profile.frozen}
    owners = {n: set(range(S)) for n in params}

    def score(o):  # (step time, (largest per-rank memory, frozen parameters held over all ranks))
        res = simulate(profile, bounds, n_mb, schedule, "fill", owners=o, **sim)
        return res.time, (max(m["total"] for m in res.memory), sum(params[n] * len(o[n]) for n in params))

    best_t, best_held = score(owners)
    for name in sorted(params, key=lambda n: -params[n]):
        for r in range(S):
            trial = {**owners, name: {r}}
            t, held = score(trial)
            if t <= best_t * (1 + tolerance) and (held, t) < (best_held, best_t):
                owners, best_held, best_t = trial, held, min(t, best_t)
    return owners


def simulate_dp(profile: Profile, n_mb: int, dp: int, dp_bw: float = float("inf"), bytes_per_param: float = 16.0,
                frozen_bytes_per_param: float = 2.0, fsdp: bool = False, grad_bytes: float = 2.0) -> SimResult:
    """Data parallel without pipelining: one segment holding every block, frozen work inline (gradient
    accumulation over ``n_mb`` micro-batches)."""
    return simulate(profile, [(0, len(profile.blocks))], n_mb, "1f1b", "inline", dp, dp_bw, bytes_per_param,
                    frozen_bytes_per_param, fsdp, grad_bytes)


_COLORS = {"F": "#4c72b0", "B": "#55a868", "frozen": "#dd8452", "comm": "#8c8c8c"}


def plot_timeline(result: SimResult | list[Event], path: str, title: str = "", n_ranks: int | None = None) -> None:
    """A PNG Gantt chart of one iteration per rank: backbone forward/backward, frozen work, communication, with
    idle as the white space (works for simulated and for measured events)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = result.events if isinstance(result, SimResult) else result
    n = n_ranks or (max(e.rank for e in events) + 1)
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.45 * n))
    for e in events:
        ax.barh(e.rank, (e.end - e.start) * 1e3, left=e.start * 1e3, color=_COLORS.get(e.kind, "#cccccc"),
                edgecolor="white", linewidth=0.4)
        if e.kind in ("F", "B") and e.mb >= 0:
            ax.text((e.start + e.end) / 2 * 1e3, e.rank, f"{e.kind}{e.mb}", ha="center", va="center", fontsize=6,
                    color="white")
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    fig.legend(handles, ["forward", "backward", "frozen work", "communication"], loc="lower center", ncol=4,
               fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
