"""Tier 2: noise assignment on 2 gloo ranks (one torchrun launch). The global scope equals one process
assigning the gathered batch; the rank scope equals each rank's batch assigned alone; knn and none do not
depend on the split."""
import pytest
import torch

from difftrain.diffusion.assign import linear_assign
from difftrain.diffusion.keyed import keyed_randn
from tests.conftest import torchrun
from tests.distributed.assign_job import GLOBAL_BATCH, SHAPE, STEP, data, stage


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("assign")
    torchrun(2, ["tests/distributed/assign_job.py", str(out)], timeout=120)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _cat(ranks, key):
    return torch.cat([r[key] for r in ranks])


def test_global_scope_equals_single_process_on_the_gathered_batch(ranks):
    idx = _cat(ranks, "index")
    assert torch.equal(idx, torch.arange(GLOBAL_BATCH))
    single = stage("linear", "rank").prepare({"x0": data(idx), "index": idx, "cond": {}}, STEP)
    assert torch.equal(_cat(ranks, "global"), single["eps"])
    assert torch.equal(_cat(ranks, "global_t"), single["t"])  # t drawn independently of the assignment
    # the gathered solve really mixes the ranks' noises: not the same as per-rank assignment
    assert not torch.equal(_cat(ranks, "global"), _cat(ranks, "rank"))


def test_rank_scope_equals_each_rank_alone(ranks):
    for r in ranks:
        eps = keyed_randn(3, STEP, r["index"], SHAPE)
        assert torch.equal(r["rank"], linear_assign(data(r["index"]), eps))


@pytest.mark.parametrize("assign", ["knn", "none"])
def test_per_sample_assigners_do_not_depend_on_the_split(ranks, assign):
    idx = _cat(ranks, "index")
    single = stage(assign, "rank").prepare({"x0": data(idx), "index": idx, "cond": {}}, STEP)
    assert torch.equal(_cat(ranks, assign), single["eps"])


def test_uneven_rank_batches_gather_and_slice(ranks):
    idx = _cat(ranks, "uneven_index")
    assert [len(r["uneven_index"]) for r in ranks] == [5, 7]
    assert torch.equal(_cat(ranks, "uneven"), linear_assign(data(idx), keyed_randn(3, STEP, idx, SHAPE)))
