"""Who am I in the job: rank, world size and rendezvous from torchrun, DeepSpeed, SLURM or MPI env.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
srun exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, mpirun OMPI_COMM_WORLD_*; both need
MASTER_ADDR / MASTER_PORT from the job script. With none of them we are a single process.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_SOURCES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def discover() -> ProcessEnv:
    for names, launcher in zip(_SOURCES, ("torchrun", "slurm", "mpi")):
        if names[0] in os.environ and names[1] in os.environ:
            r, w, lr = (int(os.environ.get(n, 0)) for n in names)
            return ProcessEnv(r, w, lr, launcher)
    return ProcessEnv(0, 1, 0, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: torch.device) -> ProcessEnv:
    """Start the default process group (NCCL on CUDA, gloo on CPU), even for a single process,
    so DCP, FSDP2 and DDP take one code path."""
    env = discover()
    if dist.is_initialized():
        return env
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError(f"{env.launcher} launch with {env.world_size} ranks needs MASTER_ADDR and MASTER_PORT")
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent shares one store with its ranks across restarts: without a prefix of their own, the ranks
        # of a restarted attempt read the previous attempt's addresses and fail to connect. (A node that joins after
        # a restart counts its restarts from 0: such elastic jobs set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the
        # agents, so that each attempt's rank 0 hosts a fresh store, and no prefix is used.)
        store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size))
        store = dist.PrefixStore(f"difftrain/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                            device_id=device if device.type == "cuda" else None)
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
