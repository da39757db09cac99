"""Who am I in the job: rank, world size and rendezvous from torchrun, DeepSpeed, MPI or SLURM env.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. mpirun
exports only ranks (OpenMPI's OMPI_COMM_WORLD_*, MPICH / Intel MPI's PMI_RANK / PMI_SIZE / MPI_LOCALRANKID) and
srun only SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID: :func:`rendezvous` then finds the address itself (mpi4py
broadcasts rank 0's host and a free port; under srun the first host of the step's node list and a port derived
from the job id), so no job script needs to set MASTER_ADDR. MASTER_ADDR / MASTER_PORT in the environment always
win. With none of these we are a single process.
"""
from __future__ import annotations

import os
import socket
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from difftrain.errors import DifftrainError

# (rank, world size, local rank, launcher), first match wins. MPI comes before SLURM: mpirun inside an sbatch
# allocation starts its daemons with srun, so its ranks also see SLURM_PROCID (the daemon's, not theirs). MPICH's
# PMI_RANK counts only with hydra's MPI_LOCALRANKID: srun --mpi=pmi2 sets PMI_RANK too, and there SLURM_* are right.
_SOURCES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "mpi"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "mpi"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "slurm"),
)
# srun's ports: every rank computes the same one without talking (there is no store yet), from the job and step
# ids, in 10000-29999, below Linux's ephemeral range (32768-60999) where the kernel picks outgoing ports
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def discover() -> ProcessEnv:
    for r, w, lr, launcher in _SOURCES:
        needed = (r, w, lr) if r == "PMI_RANK" else (r, w)
        if all(n in os.environ for n in needed):
            return ProcessEnv(int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, 0)), launcher)
    return ProcessEnv(0, 1, 0, "single")


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """The rendezvous port of a srun step, the same on every rank of it (a hash, so consecutive job ids spread)."""
    return SLURM_PORT_BASE + zlib.crc32(f"{job_id}.{step_id}".encode()) % SLURM_PORT_SPAN


def _connect_to(host: str) -> str:
    """``host`` as this process reaches it: over loopback when it is this machine (no DNS needed; rank 0's store
    listens on every interface), else by name."""
    short = host.split(".")[0]
    return "127.0.0.1" if short in ("localhost", socket.gethostname().split(".")[0]) else host


def _slurm_addr() -> str:
    from difftrain.launch.hostlist import hostnames

    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if os.environ.get(var):
            try:
                return _connect_to(hostnames(os.environ[var], var)[0])
            except ValueError as e:
                raise DifftrainError(f"srun launch: {e}; set MASTER_ADDR") from None
    raise DifftrainError("srun launch: none of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set to find the first node; "
                         "set MASTER_ADDR")


def _slurm_port() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not job:
        raise DifftrainError("srun launch: SLURM_JOB_ID is not set to derive the rendezvous port; set MASTER_PORT")
    return str(slurm_port(job, os.environ.get("SLURM_STEP_ID", "0")))


def _mpi_rendezvous() -> tuple[str, str]:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DifftrainError(f"mpirun launch without MASTER_ADDR/MASTER_PORT needs mpi4py ({e}): "
                             "pip install -e .[cluster]") from None
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), os.environ.get("MASTER_PORT") or str(_free_port(""))) if comm.rank == 0 else None
    host, port = comm.bcast(mine, root=0)  # every rank calls it: all see the same MASTER_* (mpirun -x exports)
    return _connect_to(host), port


def rendezvous(env: ProcessEnv) -> None:
    """Set MASTER_ADDR / MASTER_PORT for ``env`` where the launcher did not (explicit values win)."""
    e = os.environ
    if "MASTER_ADDR" in e and "MASTER_PORT" in e:
        return
    if env.world_size == 1:
        e.setdefault("MASTER_ADDR", "127.0.0.1")
        e.setdefault("MASTER_PORT", str(_free_port()))
    elif env.launcher == "mpi":
        addr, port = _mpi_rendezvous()
        e.setdefault("MASTER_ADDR", addr)
        e.setdefault("MASTER_PORT", port)
    elif env.launcher == "slurm":  # each from the environment, else found: both found before either is set
        addr, port = e.get("MASTER_ADDR") or _slurm_addr(), e.get("MASTER_PORT") or _slurm_port()
        e["MASTER_ADDR"], e["MASTER_PORT"] = addr, port
    elif "MASTER_PORT" in e:
        e["MASTER_ADDR"] = "127.0.0.1"
    else:
        raise DifftrainError(f"{env.launcher} launch with {env.world_size} ranks needs MASTER_ADDR and MASTER_PORT")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
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
    rendezvous(env)
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
