"""Tier 2: pipeline-parallel steps on 2 gloo ranks (one torchrun launch) and 1F1B on 4 ranks (one launch): every
schedule's gradients equal a single-process step on the same batch, and its micro-batch losses the whole
model's, for DiT (text, adaLN-single) and the UNet (skips across segments)."""
import pytest
import torch

from tests.conftest import torchrun
from tests.distributed.pipeline_job import CASES, FILL_CASES, B, M


def _launch(world, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"pipeline{world}")
    torchrun(world, ["tests/distributed/pipeline_job.py", str(out)], timeout=240)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _launch(2, tmp_path_factory)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _launch(4, tmp_path_factory)


def _check(ranks, case):
    owned = [set(r[case]["grads"]) for r in ranks]
    assert all(owned), "every rank owns parameters"
    assert not set.intersection(*owned), "no parameter on two ranks"
    for r in ranks:
        for name, g in r[case]["grads"].items():
            ref = r[case]["ref"][name]
            rel = (g - ref).norm() / ref.norm().clamp_min(1e-30)
            assert rel <= 1e-10 or (g - ref).abs().max() <= 1e-14, (case, name, float(rel))  # float64
    last = [r[case] for r in ranks if r[case]["losses"]]
    assert len(last) == 1 and len(last[0]["losses"]) == M
    torch.testing.assert_close(torch.tensor(last[0]["losses"]), torch.tensor(last[0]["ref_mb_losses"]),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks(two, case):
    _check(two, case)
    ids = sorted(i for r in two for i in r[case]["ids"])
    assert ids == list(range(len(ids)))  # every segment runs exactly once


@pytest.mark.parametrize("case", sorted(FILL_CASES))
def test_two_ranks_frozen_work(two, case):
    """Fill (GPipe/1F1B) and the balanced fallback (others): delivered frozen outputs equal the inline computation
    on every rank, and the step fed by them has the single-process gradients."""
    _check(two, case)
    for r in two:
        assert r[case]["frozen_diff0"] == 0 and r[case]["frozen_diff1"] == 0


@pytest.mark.parametrize("case", [c for c, spec in FILL_CASES.items() if spec[3] == "fill"])
def test_fill_runs_next_iterations_frozen_work_inside_this_one(two, case):
    inside = 0
    for r in two:
        for it, tr in enumerate(r[case]["trace"]):
            t0, t1 = tr["window"]
            frozen = [e for e in tr["events"] if e[0] == "frozen" and e[1].startswith(f"it{it + 1}:")]
            assert frozen or not r[case]["placement"]
            assert all(t0 <= e[2] <= e[3] <= t1 for e in frozen)
            backbone = [e for e in tr["events"] if e[0] in ("F", "B")]
            inside += sum(backbone[0][3] <= e[2] and e[3] <= backbone[-1][2] for e in frozen)
    assert inside > 0  # some of iteration k+1's frozen work ran between iteration k's own actions


def _check_current(ranks, case):
    """Iteration 0 had nothing prefetched: its own frozen work ran in its own bubbles (simulate.current_plan) and
    was delivered mid-step to the first and last segments, exactly equal to the inline computation, and the step's
    losses equal the whole model's on the inline outputs."""
    last = len(ranks) - 1
    for q, r in enumerate(ranks):
        res = r[case]
        outs = res["current"]["outputs"]
        if q in (0, last):
            assert sorted(outs) == list(range(M))
            for i, o in outs.items():
                for k, ts in o.items():
                    for a, b in zip(ts, res["inline0"][i][k]):
                        assert a.dtype == b.dtype and torch.equal(a, b), (case, q, i, k)
        else:
            assert not outs
        placed = [p for p in res["current"]["pieces"] if not p[5]]
        labels = {e[1] for e in res["trace"][0]["events"] if e[0] == "frozen" and e[1].startswith("it0:")}
        assert labels == {f"it0:{n}[{mb}:{lo}:{hi}]" for _, n, mb, lo, hi, _ in placed}
        assert not any(p[5] for p in res["current"]["pieces"]) or q == 0  # only the first segment runs inline
    assert any(p for q, r in enumerate(ranks) if q > 0 for p in r[case]["current"]["pieces"])
    covered = sorted((n, mb, lo, hi) for r in ranks for _, n, mb, lo, hi, _ in r[case]["current"]["pieces"])
    for n in ("text", "vae"):
        for i in range(M):
            spans = [(lo, hi) for nn, mb, lo, hi in covered if (nn, mb) == (n, i)]
            assert spans[0][0] == 0 and spans[-1][1] == B // M and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    res = ranks[last][case]
    torch.testing.assert_close(torch.tensor(res["losses0"]), torch.tensor(res["ref_losses0"]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", [c for c, spec in FILL_CASES.items() if spec[3] == "fill"])
def test_fill_runs_a_first_iterations_frozen_work_in_its_own_bubbles(two, case):
    _check_current(two, case)
    pieces = two[1][case]["current"]["pieces"]
    if len(FILL_CASES[case]) > 4:  # the first segment does not hold the text encoder: rank 1 encodes all of it
        assert {(name, mb) for _, name, mb, _, _, _ in pieces} == {("text", i) for i in range(M)}
    else:
        assert 0 not in {mb for _, _, mb, _, _, _ in pieces} and len(pieces) >= 4  # rank 1's warm-up bubble


@pytest.mark.parametrize("case", [c for c, spec in FILL_CASES.items() if len(spec) > 4])
def test_frozen_modules_partitioned_across_ranks(two, case):
    """Each rank holds one frozen module (the other is not callable there): the outputs still reach every rank
    exactly, and the steps fed by them have the single-process gradients."""
    owned = FILL_CASES[case][4]
    for q, r in enumerate(two):
        for pieces in r[case]["placement"].values():
            assert all(owned[name] == q for name, _, _, _ in pieces)
        if "current" in r[case]:
            assert all(owned[name] == q for _, name, _, _, _, _ in r[case]["current"]["pieces"])


def test_fill_splits_a_frozen_module_across_slots(two):
    pieces = {}
    for r in two:
        for chunks in r["dit_1f1b_fill"]["placement"].values():
            for name, mb, lo, hi in chunks:
                pieces.setdefault((name, mb), []).append((lo, hi))
    assert any(len(v) > 1 for v in pieces.values())
    assert sorted(pieces) == [(n, i) for n in ("text", "vae") for i in range(M)]


def test_four_ranks_1f1b_fill(four):
    _check(four, "dit_1f1b_fill")
    assert all(r["dit_1f1b_fill"]["frozen_diff1"] == 0 for r in four)
    _check_current(four, "dit_1f1b_fill")
    owners = {}
    for q, r in enumerate(four):  # a middle rank's pieces reach both ends; one micro-batch is split over two ranks
        for _, n, mb, lo, hi, _ in r["dit_1f1b_fill"]["current"]["pieces"]:
            owners.setdefault((n, mb), set()).add(q)
    assert any(len(v) > 1 for v in owners.values()) and any(q in (1, 2) for v in owners.values() for q in v)


def test_four_ranks_1f1b(four):
    _check(four, "dit_1f1b")
    assert [r["dit_1f1b"]["ids"] for r in four] == [[0], [1], [2], [3]]
