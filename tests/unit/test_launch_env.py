"""Who am I and where is rank 0, from each launcher's environment (``launch/env.py``), in this process."""
import socket
import sys

import pytest

from difftrain.errors import DifftrainError
from difftrain.launch import env as launch_env
from difftrain.launch.env import ProcessEnv, discover, rendezvous, slurm_port

VARS = ["MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID",
        "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]


@pytest.fixture()
def environ(monkeypatch):
    for v in VARS:  # set, then deleted: monkeypatch then restores each (absent ones too) after what rendezvous writes
        monkeypatch.setenv(v, "")
        monkeypatch.delenv(v)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: our own parser reads the node list

    def set_(**kv):
        for k, v in kv.items():
            monkeypatch.setenv(k, str(v))
    return set_


def test_each_launcher_is_read(environ):
    assert discover() == ProcessEnv(0, 1, 0, "single")
    environ(SLURM_PROCID=5, SLURM_NTASKS=8, SLURM_LOCALID=1)
    assert discover() == ProcessEnv(5, 8, 1, "slurm")
    environ(PMI_RANK=2, PMI_SIZE=8)  # srun --mpi=pmi2 sets these too: without hydra's local rank SLURM_* count
    assert discover() == ProcessEnv(5, 8, 1, "slurm")
    environ(MPI_LOCALRANKID=0)  # MPICH / Intel MPI's hydra
    assert discover() == ProcessEnv(2, 8, 0, "mpi")
    environ(OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_SIZE=8, OMPI_COMM_WORLD_LOCAL_RANK=3)  # mpirun inside sbatch
    assert discover() == ProcessEnv(3, 8, 3, "mpi")
    environ(RANK=7, WORLD_SIZE=8, LOCAL_RANK=3)  # torchrun / deepspeed (also under srun)
    assert discover() == ProcessEnv(7, 8, 3, "torchrun")


def test_srun_finds_the_first_node_and_a_port_from_the_job(environ):
    environ(SLURM_PROCID=1, SLURM_NTASKS=4, SLURM_LOCALID=1, SLURM_JOB_ID=123456, SLURM_STEP_ID=2,
            SLURM_JOB_NODELIST="other[1-2]", SLURM_STEP_NODELIST="gpu[07-08],x")
    rendezvous(discover())
    assert launch_env.os.environ["MASTER_ADDR"] == "gpu07"  # the step's node list first
    assert launch_env.os.environ["MASTER_PORT"] == str(slurm_port("123456", "2"))


def test_srun_on_this_node_connects_over_loopback(environ):
    environ(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_ID=9,
            SLURM_JOB_NODELIST=f"{socket.gethostname()},gpu2")
    rendezvous(discover())
    assert launch_env.os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_explicit_master_vars_win(environ):
    environ(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_ID=9, SLURM_JOB_NODELIST="gpu[1-2]",
            MASTER_PORT=4321)
    rendezvous(discover())
    assert (launch_env.os.environ["MASTER_ADDR"], launch_env.os.environ["MASTER_PORT"]) == ("gpu1", "4321")
    environ(MASTER_ADDR="head", MASTER_PORT=1234)
    rendezvous(discover())
    assert (launch_env.os.environ["MASTER_ADDR"], launch_env.os.environ["MASTER_PORT"]) == ("head", "1234")


def test_srun_without_what_it_needs_says_which_variable(environ):
    environ(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_NODELIST="gpu[1-2]")
    with pytest.raises(DifftrainError, match="SLURM_JOB_ID is not set"):
        rendezvous(discover())
    environ(SLURM_JOB_NODELIST="gpu[1-", SLURM_JOB_ID=3)
    with pytest.raises(DifftrainError, match="SLURM_JOB_NODELIST 'gpu\\[1-' has an unclosed"):
        rendezvous(discover())


def test_slurm_ports_are_the_same_for_a_step_and_spread_over_jobs():
    ports = {slurm_port(str(j)) for j in range(1000, 1200)}
    assert all(10000 <= p < 30000 for p in ports) and len(ports) > 190
    assert slurm_port("77", "0") == slurm_port("77", "0") != slurm_port("77", "1")


def test_mpirun_without_mpi4py_names_the_extra(environ, monkeypatch):
    environ(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_LOCAL_RANK=0)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(DifftrainError, match=r"needs mpi4py .*pip install -e \.\[cluster\]"):
        rendezvous(discover())


def test_torchrun_without_a_port_is_refused(environ):
    environ(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0)
    with pytest.raises(DifftrainError, match="torchrun launch with 2 ranks needs MASTER_ADDR and MASTER_PORT"):
        rendezvous(discover())
