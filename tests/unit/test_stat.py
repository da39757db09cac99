"""``difftrain data stat``: one exact pass over shards with known bad samples, through the real loader."""
from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import sys

import pytest
from PIL import Image

from difftrain.config import ConfigError
from difftrain.data.stat import add_stat_args, run_stat
from tests.conftest import run_cmd
from tests.unit.test_data import write_tar

LAST_LINE = re.compile(r"good=(\d+) skipped=(\d+) samples_per_s=(\d+\.\d)")


def png(color: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (color, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def good(i: int, punsafe: float = 0.1) -> dict:
    return {"__key__": f"{i:09d}", "png": png(i), "txt": f"sample {i}".encode(),
            "json": json.dumps({"punsafe": punsafe}).encode()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards in the spec, 00003 missing: 16 good samples (2 with punsafe 0.9), a corrupt PNG, a sample
    with a pickle, one without a caption."""
    d = tmp_path_factory.mktemp("stat")
    write_tar(d / "00000.tar", [good(0), good(1), {**good(2), "png": png()[:40]}, good(3), good(4),
                                good(5, punsafe=0.9)])
    write_tar(d / "00001.tar", [good(6), {**good(7), "pkl": pickle.dumps({"x": 1})}, good(8),
                                {k: v for k, v in good(9).items() if k != "txt"}, good(10)])
    write_tar(d / "00002.tar", [good(i) for i in range(11, 17)] + [good(17, punsafe=0.9), good(18)])
    return f"{d}/{{00000..00003}}.tar"


def args(*argv):
    p = argparse.ArgumentParser()
    add_stat_args(p)
    return p.parse_args([*argv, "--no-progress"])


@pytest.mark.parametrize("workers,batch", [(0, 1), (0, 4), (2, 3)])
def test_exact_counts_one_pass(shards, capsys, workers, batch):
    res = run_stat(args(shards, "data.image_size=8", "--workers", str(workers), "--batch-size", str(batch)))
    skipped = {"decode_error": 1, "unsafe_member": 1, "missing_caption": 1, "shard_unreadable": 1}
    assert res["complete"] and res["good"] == 16 and res["skipped"] == skipped
    assert res["skipped_total"] == 4 and res["samples_read"] == 19  # shard_* count shards, not samples
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST_LINE.fullmatch(lines[-1])
    assert m and m.groups()[:2] == ("16", "4") and float(m.group(3)) > 0
    assert "| skipped/shard_unreadable | 1 | 25.00 % of shards |" in lines
    assert "| skipped/decode_error | 1 | 5.26 % of samples |" in lines


def test_overrides_filters_and_partial_pass(shards, capsys):
    res = run_stat(args(shards, "data.image_size=8", 'data.filters={punsafe: "<0.5"}', "--workers", "0",
                        "--batch-size", "2"))
    assert res["good"] == 14 and res["skipped"]["filtered:punsafe"] == 2
    res = run_stat(args(shards, "data.require_caption=false", "--workers", "0", "--batch-size", "2",
                        "--max-samples", "3"))
    assert not res["complete"] and 3 <= res["good"] <= 4
    assert "partial pass" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.\\* overrides only"):
        run_stat(args(shards, "optim.lr=1"))
    with pytest.raises(ConfigError, match="data.image_size"):
        run_stat(args(shards, "data.image_size=big"))


def test_mostly_broken_data_is_reported_not_refused(tmp_path, capsys):
    """More than data.max_skip_rate broken (past the loader's 200-sample minimum) stops training, not stat."""
    write_tar(tmp_path / "00000.tar", [good(0), *({**good(i), "png": b"not a png"} for i in range(1, 240)), good(240)])
    res = run_stat(args(str(tmp_path / "00000.tar"), "--workers", "0", "--batch-size", "2"))
    assert res["good"] == 2 and res["skipped"] == {"decode_error": 239}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("good=2 skipped=239 samples_per_s=")


def test_module_entry_point(shards):
    p = run_cmd([sys.executable, "-m", "difftrain", "data", "stat", shards, "data.image_size=8", "--workers", "1",
                 "--batch-size", "4"], timeout=120)
    m = LAST_LINE.fullmatch(p.stdout.strip().splitlines()[-1])
    assert m and m.groups()[:2] == ("16", "4")
    assert "data stat" in p.stderr  # the tqdm bar


def test_every_shard_read_once(shards):
    """Streams that finish early never read on into the next epoch (where a broken shard would count again)."""
    res = run_stat(args(shards.replace("00003", "00009"), "data.image_size=8", "--workers", "2", "--batch-size", "2"))
    assert res["good"] == 16 and res["skipped"]["shard_unreadable"] == 7 and res["samples_read"] == 19
