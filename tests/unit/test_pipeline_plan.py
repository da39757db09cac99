"""Pipeline planning: partitioner (vs brute force and a uniform split), schedule orders, the event simulator
(closed forms, work conservation of bubble filling, splitting a frozen module), FLOP/wall profiles of the real
model, and ``difftrain plan``."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from difftrain.models.dit import DiT, DiTConfig
from difftrain.parallelism.pipeline.costs import (HARDWARE, BlockCost, FrozenCost, Profile, profile_blocks,
                                                  profile_frozen)
from difftrain.parallelism.pipeline.partition import partition, segment_times, uniform_bounds
from difftrain.parallelism.pipeline.orders import rank_order, schedule_orders
from difftrain.parallelism.pipeline.simulate import (_backbone, _segment_times, choose_owners, current_plan,
                                                     plot_timeline, simulate)


def _bounds_from_cuts(n, cuts):
    edges = [0, *cuts, n]
    return list(zip(edges, edges[1:]))


@pytest.mark.parametrize("seed", range(5))
def test_partition_matches_brute_force(seed):
    rng = random.Random(seed)
    n, S = 9, 3
    times = [rng.uniform(0.1, 3.0) for _ in range(n)]
    cuts = [rng.uniform(0.0, 0.5) for _ in range(n - 1)]
    extra = [rng.uniform(0.0, 2.0) for _ in range(S)]
    best = min(max(segment_times(times, _bounds_from_cuts(n, c), cuts, extra))
               for c in itertools.combinations(range(1, n), S - 1))
    got = partition(times, S, cuts, extra)
    assert [hi for _, hi in got][-1] == n and got[0][0] == 0
    assert max(segment_times(times, got, cuts, extra)) == pytest.approx(best)


def test_partition_beats_uniform_on_uneven_blocks():
    times = [4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # e.g. high-resolution blocks first
    uni = max(segment_times(times, uniform_bounds(8, 2)))
    dp = max(segment_times(times, partition(times, 2)))
    assert dp < uni - 1.0
    # frozen work charged to segment 0 pushes blocks off it
    plain, loaded = partition([1.0] * 8, 4), partition([1.0] * 8, 4, segment_extra=[3.0, 0, 0, 0])
    assert loaded[0][1] - loaded[0][0] < plain[0][1] - plain[0][0]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,M", [(2, 4), (4, 8), (4, 2)])
def test_rank_order_valid(schedule, S, M):
    for r in range(S):
        order = rank_order(schedule, r, S, M)
        assert sorted(order) == sorted([("F", i) for i in range(M)] + [("B", i) for i in range(M)])
        live, peak = set(), 0
        for kind, i in order:
            if kind == "F":
                live.add(i)
            else:
                assert i in live  # backward after its forward
                live.remove(i)
            peak = max(peak, len(live))
        assert peak == (M if schedule == "gpipe" else min(S - r, M))


def _profile(n_blocks=8, f=1.0, frozen=(), mb=8, params=100):
    return Profile([BlockCost(f, 2 * f, 64, 10, params) for _ in range(n_blocks)],
                   [FrozenCost(name, t, 16, 1000) for name, t in frozen], mb)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,M", [(2, 4), (4, 8)])
def test_simulate_closed_form(schedule, S, M):
    prof = _profile()
    r = simulate(prof, uniform_bounds(8, S), M, schedule)
    per = 8 / S * 3.0  # fwd + bwd of one segment, one micro-batch
    assert r.time == pytest.approx((M + S - 1) * per)  # Narayanan et al. 2021, eq. 1
    for idle in r.idle:
        assert idle == pytest.approx((S - 1) / (M + S - 1))
    acts = [m["activations"] for m in r.memory]
    assert acts == [(M if schedule == "gpipe" else min(S - q, M)) * 8 / S * 10 for q in range(S)]


@pytest.mark.parametrize("pp,M", [(2, 4), (2, 8), (4, 8)])
def test_simulate_multi_segment_schedules(pp, M):
    """Torch's own interleaved 1F1B and ZB-V orders: every action once; interleaved meets Megatron's closed form
    (M + (p - 1) / v)(f + b) (Narayanan et al. 2021, sec. 2.2), ZB-V beats it."""
    prof = _profile()
    per = 8 / pp * 3.0  # one rank's forward + backward of one micro-batch (all its segments)
    one = simulate(prof, uniform_bounds(8, pp), M, "1f1b")
    inter = simulate(prof, uniform_bounds(8, 2 * pp), M, "interleaved_1f1b")
    zb = simulate(prof, uniform_bounds(8, 2 * pp), M, "zero_bubble")
    assert inter.time == pytest.approx((M + (pp - 1) / 2) * per)
    assert zb.time < inter.time < one.time
    assert M * per <= zb.time
    for sched, kinds in (("interleaved_1f1b", {"F", "B"}), ("zero_bubble", {"F", "I", "W"})):
        acts = [a for o in schedule_orders(sched, pp, M) for a in o]
        assert len(acts) == len(set(acts)) == len(kinds) * 2 * pp * M and {a[0] for a in acts} == kinds
    with pytest.raises(ValueError, match="bubble filling covers"):
        simulate(prof, uniform_bounds(8, 2 * pp), M, "zero_bubble", "fill")


def _placed_samples(placement):
    got = {}
    for chunks in placement.values():
        for c in chunks:
            got.setdefault((c.name, c.mb), []).append((c.lo, c.hi))
    return got


def test_fill_places_every_sample_once_and_splits_a_module():
    S, M = 4, 4
    prof = _profile(frozen=[("text", 2.5), ("vae", 1.0)])
    r = simulate(prof, uniform_bounds(8, S), M, "1f1b", "fill")
    got = _placed_samples(r.placement)
    assert set(got) == {(n, i) for n in ("text", "vae") for i in range(M)}
    for ranges in got.values():  # the pieces of each (module, micro-batch) tile its 8 samples exactly
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == 8
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert any(len(v) > 1 for v in got.values())  # a module's micro-batch split over several gaps
    frozen_busy = sum(e.end - e.start for e in r.events if e.kind == "frozen")
    assert frozen_busy == pytest.approx(M * 3.5)


@pytest.mark.parametrize("schedule,S", [("1f1b", 2), ("1f1b", 4), ("gpipe", 3)])
def test_current_plan_meets_each_micro_batchs_first_forward(schedule, S):
    """This iteration's frozen work (nothing prefetched): every sample of every (module, micro-batch) once;
    micro-batch 0 inline on the first segment; a piece placed on any rank finishes, in the all-inline timeline,
    before the first segment's forward of its micro-batch (so delivery edges point forward in time)."""
    M = 4
    prof = _profile(frozen=[("text", 2.5), ("vae", 1.0)])
    bounds = uniform_bounds(8, S)
    plan = current_plan(prof, bounds, M, schedule)
    got = _placed_samples({r: [c for _, c, _ in ps] for r, ps in plan.items()})
    assert set(got) == {(n, i) for n in ("text", "vae") for i in range(M)}
    for ranges in got.values():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(inline for _, c, inline in plan[0] if c.mb == 0)
    assert not any(c.mb == 0 for r in plan if r for _, c, _ in plan[r])
    assert any(not inline for ps in plan.values() for _, _, inline in ps)  # some work left the first segment
    orders = schedule_orders(schedule, S, M)
    t = _backbone(*_segment_times(prof, bounds), orders, [0.0] * S, prof.frozen_time)
    per = {f.name: f.fwd / prof.mb_size for f in prof.frozen}
    for r, ps in plan.items():
        clock = {}
        for k, c, inline in ps:
            if inline:
                continue
            start = t["ends"][orders[r][k - 1]] if k else 0.0
            clock[k] = max(clock.get(k, start), start) + per[c.name] * (c.hi - c.lo)
            assert clock[k] <= t["starts"][("F", c.mb, 0)] + 1e-9
            assert clock[k] <= t["starts"][orders[r][k]] + 1e-9  # inside the gap


def test_frozen_modules_partitioned_across_ranks():
    """Two frozen modules that fit the bubbles: the chooser gives each one owner (half the frozen weights per
    rank at no simulated cost); placement, the current-iteration plan and the memory model obey the owners."""
    S, M = 4, 8
    prof = _profile(frozen=[("text", 1.0), ("vae", 0.5)])
    bounds = uniform_bounds(8, S)
    owners = choose_owners(prof, bounds, M, "1f1b")
    assert all(len(rs) == 1 for rs in owners.values()) and owners["text"] != owners["vae"]
    shared = simulate(prof, bounds, M, "1f1b", "fill")
    split = simulate(prof, bounds, M, "1f1b", "fill", owners=owners)
    assert split.time <= shared.time * 1.02
    assert max(m["frozen"] for m in split.memory) < max(m["frozen"] for m in shared.memory)
    for (r, _), cs in split.placement.items():
        assert all(r in owners[c.name] for c in cs)
    cur = current_plan(prof, bounds, M, "1f1b", owners)
    for r, ps in cur.items():
        assert all(r in owners[c.name] for _, c, _ in ps)
    got = _placed_samples({r: [c for _, c, _ in ps] for r, ps in cur.items()})
    assert all(sum(hi - lo for lo, hi in v) == 8 for v in got.values()) and len(got) == 2 * M


def test_fill_hides_frozen_work_that_fits_and_beats_inline_and_balanced():
    S, M = 4, 8
    base = simulate(_profile(), uniform_bounds(8, S), M, "1f1b")
    prof = _profile(frozen=[("text", 2.0)])  # 16 s per iteration; the bubbles hold (S - 1) x 6 s per rank
    fill = simulate(prof, uniform_bounds(8, S), M, "1f1b", "fill")
    inline = simulate(prof, uniform_bounds(8, S), M, "1f1b", "inline")
    balanced = simulate(prof, uniform_bounds(8, S), M, "1f1b", "balanced")
    assert fill.unplaced == 0
    assert fill.time == pytest.approx(base.time + prof.frozen[0].out_bytes * M / prof.p2p_bw)
    assert fill.time < balanced.time < inline.time
    assert sum(fill.idle) < sum(base.idle) - 0.2


def test_fill_leftovers_spread_over_ranks():
    S, M = 2, 8
    prof = _profile(frozen=[("big", 20.0)])  # far more than the bubbles
    fill = simulate(prof, uniform_bounds(8, S), M, "1f1b", "fill")
    balanced = simulate(prof, uniform_bounds(8, S), M, "1f1b", "balanced")
    assert fill.unplaced > 0
    assert fill.time <= balanced.time * 1.1


def test_fill_leftovers_end_level_and_never_lose_to_balanced():
    """A teacher's steps dwarf the bubbles: the leftovers are water-filled (every rank ends within one sample of
    the others, up to the per-call fixed costs), so filling is never slower than pre-computing."""
    S, M = 2, 4
    for fixed in (0.0, 3.0):
        prof = _profile(frozen=[("latents+text+teacher", 16.0)])
        prof.frozen[0].fixed = fixed
        fill = simulate(prof, uniform_bounds(8, S), M, "1f1b", "fill")
        balanced = simulate(prof, uniform_bounds(8, S), M, "1f1b", "balanced")
        assert fill.time <= balanced.time + 1e-9, fixed
        ends = [max(e.end for e in fill.events if e.rank == r) for r in range(S)]
        # level within one sample, plus the fixed costs of the calls a rank's run adds (one per micro-batch)
        assert abs(ends[0] - ends[1]) <= M * fixed + 16.0 / 8 + 1e-9
        got = _placed_samples(fill.placement)
        assert all(sum(hi - lo for lo, hi in v) == 8 for v in got.values()) and len(got) == M


def test_a_calls_fixed_cost_keeps_small_chunks_out_of_small_gaps():
    """Affine chunk costs (``FrozenCost.fixed``): a call on n of 8 samples costs fixed + (fwd - fixed) n / 8, and
    the fill plan charges it, so it places no chunk into a gap that cannot hold one call."""
    from difftrain.parallelism.pipeline.simulate import _fit, fill_plan

    f = FrozenCost("t", 8.0, 16, 0, fixed=4.0)
    assert f.chunk_seconds(8, 8) == 8.0 and f.chunk_seconds(1, 8) == 4.5 and f.chunk_seconds(4, 8) == 6.0
    assert _fit(f, 4.4, 8, 8) == 0 and _fit(f, 4.5, 8, 8) == 1 and _fit(f, 100.0, 8, 8) == 8
    prof = _profile(frozen=[("t", 8.0)])
    prof.frozen[0].fixed = 4.0
    r = simulate(prof, uniform_bounds(8, 2), 4, "1f1b", "fill")
    frozen = [e for e in r.events if e.kind == "frozen"]
    assert sum(e.end - e.start for e in frozen) == pytest.approx(sum(
        prof.frozen[0].chunk_seconds(c.hi - c.lo, 8) for cs in r.placement.values() for c in cs))


def test_dp_sync_exposed_only_beyond_backward():
    prof = _profile(params=10**6)
    fast = simulate(prof, [(0, 8)], 4, "1f1b", dp=8, dp_bw=1e12)
    slow = simulate(prof, [(0, 8)], 4, "1f1b", dp=8, dp_bw=1e5)
    assert fast.time == pytest.approx(4 * 8 * 3.0)
    assert slow.time > fast.time


def test_timeline_png(tmp_path):
    r = simulate(_profile(frozen=[("text", 1.0)]), uniform_bounds(8, 4), 4, "1f1b", "fill")
    plot_timeline(r, str(tmp_path / "t.png"), "fill")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def _tiny_dit(device="cpu"):
    with torch.device(device):
        return DiT(DiTConfig(image_size=8, in_channels=4, num_classes=0, text_dim=32, depth=4, hidden_size=64,
                             num_heads=4))


def test_flop_profile_matches_whole_model_count():
    from torch.utils.flop_counter import FlopCounterMode

    hw = HARDWARE["h100"]
    model = _tiny_dit("meta")
    with torch.device("meta"):
        inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
    costs = profile_blocks(model, inputs, "flops", hw)
    with FlopCounterMode(display=False) as fc:
        model(inputs[0], inputs[1], {"text_states": inputs[2], "text_mask": inputs[3]})
    whole = fc.get_total_flops() / (hw.peak_flops * hw.mfu)
    assert sum(c.fwd for c in costs) == pytest.approx(whole, rel=0.02)
    assert all(c.bwd == pytest.approx(2 * c.fwd) for c in costs)
    assert sum(c.params for c in costs) == sum(p.numel() for p in model.parameters())
    assert costs[-1].out_bytes == 0 and all(c.out_bytes > 0 and c.saved_bytes > 0 for c in costs[:-1])
    text = torch.nn.Linear(32, 32, device="meta")
    fz = profile_frozen("text", lambda: text(inputs[2]), "flops", hw)
    assert fz.fwd == pytest.approx(2 * 2 * 5 * 32 * 32 / (hw.peak_flops * hw.mfu)) and fz.out_bytes == 2 * 5 * 32 * 4


def test_wall_profile_on_cpu():
    torch.manual_seed(0)
    model = _tiny_dit()
    model.init_weights()
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
    costs = profile_blocks(model, inputs, "wall", reps=2)
    assert len(costs) == 4 and all(c.fwd > 0 and c.bwd > 0 for c in costs)
    assert all(p.grad is None for p in model.parameters())


def test_plan_cli_pipelines_the_model_that_does_not_fit(capsys):
    from difftrain.cli import main

    main(["plan", "dit_30b_256", "--gpus", "64"])
    out = capsys.readouterr().out
    best = next(line for line in out.splitlines() if line.startswith("best:"))
    assert "pp=" in best and "does not fit" not in best
    assert "data parallel" in out and "fill" in out


def test_plan_from_run_config(capsys, tmp_path):
    from difftrain.cli import main

    main(["plan", "configs/demo.yaml", "--gpus", "2", "--hardware", "a100", "--timeline", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "DiT-T/2" in out and "text_encoder" in out and (tmp_path / "p.png").is_file()


def test_plan_covers_distillation_stages(capsys):
    """A teacher stage's plan costs the teacher's forwards as frozen work chained after the encoders; a stage that
    cannot be pipelined is planned data parallel only, and says why."""
    from difftrain.cli import main

    base = ["plan", "configs/demo.yaml"]
    opts = ["--gpus", "4", "--hardware", "a100"]
    main([*base, "stage=pretrain", *opts])
    plain = capsys.readouterr().out
    main([*base, "stage=progressive", "stage_args.teacher=runs/t@ema", "diffusion.target=v",
          "stage_args.teacher_guidance=2.0", *opts])
    out = capsys.readouterr().out
    assert "teacher's 4 forwards per sample are frozen work" in out and "text_encoder+teacher" in out
    share = [float(line.split("; ")[1].split("%")[0]) for text in (plain, out) for line in text.splitlines()
             if line.startswith("per sample:")]
    assert share[1] > share[0] + 100  # four teacher forwards on top of the text encoder
    main([*base, "stage=consistency", "stage_args.teacher=runs/t@ema", "stage_args.solver=heun", *opts])
    out = capsys.readouterr().out
    assert "teacher's 2 forwards" in out and "target network's no-grad forward reads live weights" in out
    main([*base, "stage=dmd", "stage_args.teacher=runs/t@ema", *opts])
    out = capsys.readouterr().out
    assert "stage 'dmd' cannot be pipelined" in out and "pp=" not in out.split("best:")[1]
