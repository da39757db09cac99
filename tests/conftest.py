import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The demo data set (real scikit-learn digits as img2dataset-layout shards)."""
    from difftrain.data.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), image_size=16, shard_size=256)


def run_cmd(args: list[str], env: dict | None = None, timeout: int = 600, check: bool = True):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    p = subprocess.run(args, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def torchrun(nproc: int, args: list[str], **kw):
    return run_cmd([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--standalone", "--monitor_interval=0.5", *args], **kw)
