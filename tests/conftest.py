import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def tiny_vae(path: Path, seed: int = 0, channels: int = 1) -> Path:
    """A small randomly initialised diffusers AutoencoderKL (downsample 2, 4 latent channels) saved at ``path``,
    loaded by the same code as a pretrained one."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.5, shift_factor=0.25)
    vae.save_pretrained(path)
    return path


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


@pytest.fixture()
def world1(tmp_path):
    """A one-process gloo group (checkpoint code that runs collectives), torn down after the test."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
