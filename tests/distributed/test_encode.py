"""Tier 2: pre-encoding under torchrun with 2 ranks writes exactly the files a single process writes
(text-conditional, the real MiniLM), and a rerun on the finished folder skips every shard."""
import sys
import tarfile

import torch
from safetensors.torch import load

from tests.conftest import run_cmd, torchrun

ARGS = ["data.image_size=16", "data.channels=1", "run.progress=false", "encoders.text_max_length=8"]


def encode_cmd(digits, out) -> list[str]:
    src = digits["train"].rsplit("/", 1)[0] + "/{00000..00003}.tar"  # 4 shards: 2 per rank
    return ["-m", "difftrain", "data", "encode", "configs/demo.yaml", f"data.train={src}", "--out", str(out), *ARGS]


def tensors(path) -> dict[str, dict[str, torch.Tensor]]:
    with tarfile.open(path) as tf:
        return {m.name: load(tf.extractfile(m).read()) for m in tf if m.name.endswith(".safetensors")}


def test_two_ranks_equal_one_process(digits, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cmd([sys.executable, *encode_cmd(digits, one)])
    p = torchrun(2, encode_cmd(digits, two))
    assert "encode rank 0/2: 2 shard(s), 0 already encoded" in p.stdout
    assert "encode rank 1/2: 2 shard(s), 0 already encoded" in p.stdout
    names = sorted(f.name for f in one.iterdir())
    assert names == sorted(f.name for f in two.iterdir()) and len(names) == 4 * 2 + 2
    for n in names:
        if n.endswith(".tar"):
            a, b = tensors(one / n), tensors(two / n)
            assert a.keys() == b.keys() and len(a) == 256
            for k in a:
                assert a[k].keys() == b[k].keys()
                assert all(torch.equal(a[k][t], b[k][t]) for t in a[k]), f"{n}/{k} differs"
        assert (one / n).read_bytes() == (two / n).read_bytes(), f"{n} differs"

    before = {n: (two / n).stat().st_mtime_ns for n in names}
    p = torchrun(2, encode_cmd(digits, two))
    assert "encode rank 1/2: 2 shard(s), 2 already encoded (skipped), 0 to go" in p.stdout
    assert {n: (two / n).stat().st_mtime_ns for n in names} == before
