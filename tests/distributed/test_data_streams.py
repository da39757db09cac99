"""Tier 2: the loader under torchrun with 2 gloo ranks x 2 worker processes each: every sample exactly
once per epoch across ranks x workers, and a resume from every rank's saved state continues exactly."""
import collections
import json

from tests.conftest import torchrun


def read(d):
    return [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_exactly_once_and_exact_resume(digits, tmp_path):
    n = 80  # batch 32: each of the 4 streams gives 40 x 16 samples, past its <= 2 shards (512) of epoch 0
    torchrun(2, ["tests/distributed/data_job.py", str(tmp_path / "a"), digits["train"], str(n)])
    runs = read(tmp_path / "a")
    seen = collections.Counter(tuple(s) for r in runs for batch in r["seen"] for s in batch)
    epoch0 = [v for (e, _, _), v in seen.items() if e == 0]
    assert len(epoch0) == digits["num_train"] and set(epoch0) == {1}
    assert max(seen.values()) == 1

    for r in (0, 1):  # save the half-way states where a resume finds them
        (tmp_path / "states").mkdir(exist_ok=True)
        (tmp_path / "states" / f"rank{r}.json").write_text(json.dumps({"state": runs[r]["state"]}))
    torchrun(2, ["tests/distributed/data_job.py", str(tmp_path / "b"), digits["train"], str(n - n // 2),
                 str(tmp_path / "states")])
    resumed = read(tmp_path / "b")
    for r in (0, 1):
        assert resumed[r]["seen"] == runs[r]["seen"][n // 2:]
