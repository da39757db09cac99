"""Tier 2: ``difftrain train`` unchanged under the real launchers, on CPU gloo, each run started from the job script
``difftrain launch`` writes (or, for srun, from the environment srun sets), and each ending with the weights of a
one-process run of the same global batch (4 steps of a tiny DiT):

- torchrun: two agents on this machine as two "nodes" (``--nnodes 2``, c10d rendezvous over 127.0.0.1)
- mpirun -np 2 with no MASTER_ADDR / MASTER_PORT: mpi4py broadcasts rank 0's address and port
- srun's environment (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST / SLURM_JOB_ID), no MASTER_*
- the deepspeed launcher with a ``localhost`` hostfile (no ssh: only localhost slots are tested here), running the
  DDP engine and the DeepSpeed ZeRO-3 engine
- every target's script parses (``bash -n``); a layout the config cannot run is refused before a script is written

The five launched jobs are in the slow tier (~3-4 min together on the 2-core CPU machine); the script checks
are not."""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from difftrain.cli import main as cli
from difftrain.launch.env import _free_port, slurm_port
from difftrain.train.checkpoint import latest_checkpoint, read_train_state
from tests.conftest import REPO
from tests.distributed.test_resume import assert_same, weights

ARGS = ("configs/demo.yaml run.steps=4 run.ckpt_every=4 run.log_every=1 run.progress=false run.sample_every=0 "
        "model.name=DiT-T/2 model.cond=class model.num_classes=10 model.args.depth=2 model.args.hidden_size=64 "
        "model.args.num_heads=4 data.batch_size=8 data.num_workers=0 data.streams=2 data.shuffle_buffer=16 "
        "optim.schedule=constant optim.warmup_steps=3 optim.lr=1e-3 optim.eps=1e-6 encoders.text= eval.every=0").split()
LAUNCH_VARS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}


def _env(**extra) -> dict:
    """This environment without any launcher's variables, so each job finds its rendezvous itself."""
    e = {k: v for k, v in os.environ.items()
         if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_"))}
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _run_together(cmds: list[list[str]], envs: list[dict], logs, timeout=300) -> None:
    """Start every command at once (the ranks or agents of one job), wait for all; output to files, since the
    processes wait on each other and a full pipe would stall one."""
    files = [open(logs / f"out{i}.log", "w+") for i in range(len(cmds))]
    procs = [subprocess.Popen(c, cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT, text=True)
             for c, e, f in zip(cmds, envs, files)]
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, f in zip(procs, files):
        f.seek(0)
        out = f.read()
        f.close()
        assert p.returncode == 0, f"{' '.join(p.args)} failed ({p.returncode}):\n{out[-5000:]}"


def _script(tmp_path, target: str, nodes: int, gpus: int, *args: str, overrides=()) -> str:
    out = tmp_path / f"{target}_{nodes}x{gpus}.sh"
    cli(["launch", *ARGS, *overrides, "--target", target, "--nodes", str(nodes), "--gpus-per-node", str(gpus),
         *args, "--out", str(out)])
    return str(out)


def _same_as_reference(run_dir, reference) -> None:
    assert read_train_state(latest_checkpoint(run_dir / "checkpoints"))["world_size"] == 2
    for which in ("model", "ema"):
        step, got = weights(run_dir, which)
        ref_step, ref = weights(reference, which)
        assert step == ref_step == 4
        assert_same(ref, got, tol=1e-5)


@pytest.fixture(scope="module")
def data(digits):
    return [f"data.train={digits['train']}"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process (no launcher), the same global batch."""
    d = tmp_path_factory.mktemp("launch") / "single"
    logs = d.parent
    _run_together([[sys.executable, "-m", "difftrain", "train", *ARGS, *data, f"run.dir={d}"]], [_env()], logs)
    return d


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(reference, data, tmp_path):
    """The torchrun script for 2 nodes x 1 process, run twice on this machine: the two agents meet at the c10d
    endpoint (the first to bind it hosts the store) and number themselves."""
    d = tmp_path / "run"
    script = _script(tmp_path, "torchrun", 2, 1, "--endpoint", f"127.0.0.1:{_free_port()}",
                     overrides=[*data, f"run.dir={d}"])
    assert shlex.split(open(script).read().splitlines()[-1])[:7] == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    _run_together([["bash", script]] * 2, [_env()] * 2, tmp_path)
    _same_as_reference(d, reference)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found: install OpenMPI from the OS packages "
                    "(apt-get install openmpi-bin libopenmpi-dev), as .ci/run does")
def test_mpirun_without_master_addr(reference, data, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py missing: pip install -e .[cluster]")
    d = tmp_path / "run"
    script = _script(tmp_path, "mpirun", 1, 2, overrides=[*data, f"run.dir={d}"])
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
    _run_together([["bash", script]], [_env(OMPI_MCA_rmaps_base_oversubscribe="1", **root)], tmp_path)
    _same_as_reference(d, reference)


@pytest.mark.slow
def test_srun_environment_without_master_addr(reference, data, tmp_path):
    """What srun sets for 2 tasks on this node (SLURM_JOB_NODELIST is this host's name, as on a cluster); the port
    comes from the job id, so pick a job id whose port is free here."""
    job = next(j for j in range(os.getpid(), os.getpid() + 1000) if _port_free(slurm_port(str(j))))
    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "difftrain", "train", *ARGS, *data, f"run.dir={d}"]
    envs = [_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_JOB_ID=str(job),
                 SLURM_JOB_NODELIST=socket.gethostname()) for r in range(2)]
    _run_together([cmd, cmd], envs, tmp_path)
    _same_as_reference(d, reference)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed: "
                    "pip install -e .[cluster]")
@pytest.mark.parametrize("engine", [(), ("parallel.engine=deepspeed", "parallel.zero_stage=3")],
                         ids=["ddp", "deepspeed_zero3"])
def test_deepspeed_launcher_on_localhost(reference, data, tmp_path, engine):
    """Our engines under DeepSpeed's own launcher: DDP, and the ZeRO-3 engine (train/deepspeed_engine.py)."""
    d = tmp_path / "run"
    script = _script(tmp_path, "deepspeed", 1, 2, "--port", str(_free_port()),
                     overrides=[*data, *engine, f"run.dir={d}"])
    assert "localhost slots=2" in open(script).read()
    _run_together([["bash", script]], [_env()], tmp_path)
    _same_as_reference(d, reference)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("target", ["torchrun", "slurm", "deepspeed", "mpirun"])
def test_each_target_writes_a_script_bash_parses(target, data, tmp_path):
    script = _script(tmp_path, target, 2, 4, "--hosts", "gpu[01-02]",
                     overrides=[*data, "data.streams=8", "data.batch_size=16", "run.dir=runs/x"])
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    cmd = shlex.split(text.splitlines()[-1])
    assert cmd[cmd.index("difftrain") + 1:][:2] == ["train", "configs/demo.yaml"] and cmd[-1] == "run.dir=runs/x"
    want = {"torchrun": ["--rdzv-endpoint gpu01:29500", "--nnodes 2 --nproc-per-node 4"],
            "slurm": ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "srun "],
            "deepspeed": ["gpu01 slots=4\ngpu02 slots=4\n", "--master_addr gpu01", "--module difftrain train"],
            "mpirun": ["-np 8 --map-by ppr:4:node", "--host gpu01:4,gpu02:4", "--allow-run-as-root"]}[target]
    for w in want:
        assert w in text, w


def test_a_layout_the_config_cannot_run_is_refused(data, tmp_path, capsys):
    out = tmp_path / "job.sh"
    with pytest.raises(SystemExit) as e:  # batch 8 over 3 data-parallel ranks
        cli(["launch", *ARGS, *data, "--target", "slurm", "--nodes", "3", "--gpus-per-node", "1", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert "config key 'data.batch_size' = 8 must be a multiple of the data-parallel size 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["launch", *ARGS, *data, "--target", "deepspeed", "--nodes", "2", "--gpus-per-node", "1", "--out",
             str(out)])
    assert "needs --hosts" in capsys.readouterr().err and not out.exists()
