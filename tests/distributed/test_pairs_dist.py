"""``difftrain distill pairs`` under torchrun: 1 and 2 ranks write byte-identical shards and encode_info.json, and a
run SIGKILLed after its first shard, rerun (on 2 ranks), ends byte-identical to an uninterrupted one."""
import json
import sys

import pytest

from tests.conftest import run_cmd, torchrun
from tests.distributed.test_resume import train

pytestmark = pytest.mark.slow


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pairs_are_byte_identical_on_1_and_2_ranks_and_after_a_kill(digits, tmp_path):
    teacher = tmp_path / "teacher"
    train(1, teacher, digits, "run.steps=2", "run.ckpt_every=2")
    args = ["-m", "difftrain", "distill", "pairs", str(teacher), "--count", "21", "--batch", "3", "--shard-size", "6",
            "--steps", "3"]  # 4 shards (6, 6, 6, 3); the teacher's own solver (dpmpp_2m) and CFG scale (2.0)
    ref, two, killed = tmp_path / "ref", tmp_path / "two", tmp_path / "killed"
    out = torchrun(1, [*args, "--out", str(ref)]).stdout
    assert "pairs: 4/4 shards (21 pairs) of teacher step 2 (dpmpp_2m, 3 steps, guidance 2)" in out
    torchrun(2, [*args, "--out", str(two)])
    names = {"encode_info.json", *(f"0000{k}.tar" for k in range(4))}
    assert set(files(ref)) == names and files(two) == files(ref)
    info = json.loads((ref / "encode_info.json").read_text())
    assert info["pairs"]["step"] == 2 and info["pairs"]["count"] == 21 and info["pairs"]["cond"] == "class"

    p = run_cmd([sys.executable, *args, "--out", str(killed)], env={"DIFFTRAIN_FAULT": "kill_after_shard:1:0"},
                check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    assert set(files(killed)) == {"encode_info.json", "00000.tar"}
    out = torchrun(2, [*args, "--out", str(killed)]).stdout
    assert "pairs: 4/4 shards" in out and "1 of rank 0's already there" in out
    assert files(killed) == files(ref)
