"""``difftrain launch``: the job script that starts ``difftrain train`` on N nodes x G processes under one launcher.

    difftrain launch configs/demo.yaml run.dir=runs/big --target torchrun --nodes 4 --gpus-per-node 8
    difftrain launch configs/demo.yaml --target slurm --nodes 4 --gpus-per-node 8 --out job.sbatch && sbatch job.sbatch
    difftrain launch configs/demo.yaml --target deepspeed --nodes 2 --gpus-per-node 8 --hosts "gpu[01-02]"
    difftrain launch configs/demo.yaml --target mpirun --nodes 2 --gpus-per-node 8 --hosts gpu01,gpu02

Each script runs ``difftrain train`` unchanged: the processes learn rank, world size, local rank and the rendezvous
from the environment their launcher sets (``launch/env.py``). The config is checked for the world size N*G first
(``config_checks.check_launch``: layout, batch split, files), so a layout that cannot run is refused before any job
is written. Nothing here starts a job; the scripts are bash (``bash -n`` parses them)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from difftrain.config import ConfigError

TARGETS = ("torchrun", "slurm", "deepspeed", "mpirun")
DEFAULT_PORT = 29500


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, passed on to difftrain train")
    p.add_argument("--target", required=True, choices=TARGETS, help="the launcher the script uses")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes N")
    p.add_argument("--gpus-per-node", type=int, required=True, help="processes (GPUs) per node G; world size N*G")
    p.add_argument("--hosts", help="the nodes, a list or Slurm's compact form (gpu[01-04]): the deepspeed hostfile "
                                   "and mpirun --host; the first is torchrun's rendezvous host")
    p.add_argument("--endpoint", help="torchrun's c10d rendezvous HOST[:PORT] (default: the first host of --hosts; one "
                                    "node: localhost; the port: --port)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="rendezvous port (torchrun, deepspeed)")
    p.add_argument("--out", help="write the script to this file (executable) instead of printing it")


def _hosts(text: str | None, nodes: int) -> list[str] | None:
    if text is None:
        return None
    from difftrain.launch.hostlist import expand_hostlist

    try:
        hosts = expand_hostlist(text, "--hosts")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(hosts) != nodes:
        raise ConfigError(f"--hosts '{text}' names {len(hosts)} hosts for --nodes {nodes}")
    return hosts


def _q(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def job_script(target: str, config: str, overrides: list[str], nodes: int, gpus: int, *, hosts: list[str] | None = None,
               endpoint: str | None = None, port: int = DEFAULT_PORT, run_id: str = "difftrain",
               gpu_job: bool = True) -> str:
    """The bash script for ``target``. ``run_id``: torchrun's rendezvous id (the same on every node); ``gpu_job``:
    whether the sbatch script asks for GPUs."""
    world = nodes * gpus
    train = ["train", config, *overrides]
    head = ["#!/usr/bin/env bash",
            f"# difftrain launch --target {target}: {nodes} node(s) x {gpus} process(es) = world size {world}"]
    if target == "torchrun":
        if endpoint is not None and ":" not in endpoint:
            endpoint = f"{endpoint}:{port}"
        if endpoint is None:
            endpoint = f"{hosts[0]}:{port}" if hosts else f"localhost:{port}" if nodes == 1 else None
        rdzv = shlex.quote(endpoint) if endpoint else f'"${{RDZV_HOST:?set RDZV_HOST to the first node}}:{port}"'
        head += ["# run this same script on every node: the agents meet at the c10d endpoint (a host every node "
                 "reaches)", "# and number the nodes and ranks themselves (no --node-rank, no MASTER_ADDR)"]
        body = [f"torchrun --nnodes {nodes} --nproc-per-node {gpus} --rdzv-backend c10d --rdzv-endpoint {rdzv} "
                f"--rdzv-id {shlex.quote(run_id)} -m difftrain {_q(train)}"]
    elif target == "slurm":
        head[0] = "#!/bin/bash"
        head += ["#SBATCH --job-name=difftrain", f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={gpus}"]
        head += [f"#SBATCH --gpus-per-node={gpus}"] if gpu_job else []
        head += ["# one task per process: each reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and meets the "
                 "others at", "# the first node of the step on a port derived from SLURM_JOB_ID (no MASTER_ADDR)"]
        body = [f"srun --kill-on-bad-exit=1 python -m difftrain {_q(train)}"]
    elif target == "deepspeed":
        if hosts is None:
            if nodes > 1:
                raise ConfigError(f"--target deepspeed --nodes {nodes} needs --hosts: the hostfile names each node")
            hosts = ["localhost"]
        local = hosts == ["localhost"]
        head += ["# the hostfile lists each node's slots; the launcher reaches the nodes over ssh (pdsh), except a "
                 "single", "# localhost entry, which it starts here. Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / "
                 "MASTER_* from it."]
        lines = "\n".join(f"{h} slots={gpus}" for h in hosts)
        body = ["hostfile=$(mktemp)", "trap 'rm -f \"$hostfile\"' EXIT",
                f"cat > \"$hostfile\" <<'HOSTS'\n{lines}\nHOSTS",
                f"deepspeed --hostfile \"$hostfile\" --num_nodes {nodes} --num_gpus {gpus} --master_addr "
                f"{'127.0.0.1' if local else shlex.quote(hosts[0])} --master_port {port} --no_local_rank "
                f"{'--no_ssh_check ' if local else ''}--module difftrain {_q(train)}"]
    elif target == "mpirun":
        head += ["# each rank reads OMPI_COMM_WORLD_*; mpi4py (pip install -e .[cluster]) broadcasts rank 0's "
                 "address and a free port", "# (no MASTER_ADDR). As root (containers) add --allow-run-as-root, or "
                 "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.",
                 "# --bind-to none: a rank's data loader workers need cores beyond its own."]
        where = f"--host {','.join(f'{shlex.quote(h)}:{gpus}' for h in hosts)} " if hosts else ""
        body = [f"mpirun -np {world} --map-by ppr:{gpus}:node --bind-to none {where}-x PATH python -m difftrain "
                f"{_q(train)}"]
    else:
        raise ConfigError(f"--target {target}: expected one of {', '.join(TARGETS)}")
    return "\n".join([*head, "set -euo pipefail", *body]) + "\n"


def run_launch(args) -> None:
    from difftrain.config import config_hash
    from difftrain.config_checks import load_config

    for flag in ("nodes", "gpus_per_node"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    world = args.nodes * args.gpus_per_node
    cfg = load_config(args.config, args.overrides, world_size=world)  # refuse a layout that cannot run on N*G
    text = job_script(args.target, args.config, list(args.overrides), args.nodes, args.gpus_per_node,
                      hosts=_hosts(args.hosts, args.nodes), endpoint=args.endpoint, port=args.port,
                      run_id=f"difftrain-{config_hash(cfg)[:12]}", gpu_job=cfg.run.device != "cpu")
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote the {args.target} job ({args.nodes} x {args.gpus_per_node} = world size {world}) to {out}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
