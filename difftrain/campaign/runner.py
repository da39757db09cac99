"""``difftrain campaign FILE.yaml``: run a campaign's stages in order in this process, then evaluate them.

    torchrun --nproc_per_node=2 -m difftrain campaign configs/campaigns/digits.yaml
    difftrain campaign configs/campaigns/digits.yaml --dry-run          # the plan; nothing trained
    difftrain campaign FILE --rerun rf2 rf2_1step                        # train changed stages again
    difftrain campaign FILE --only teacher pairs --skip-eval             # some stages, no evaluation

Every rank of whatever launcher started it (torchrun, srun, mpirun, or one process) runs this same driver. Each
training stage is ``Trainer(cfg, callbacks=[SampleGrid(), Validation()]).fit()`` in the same processes (the
process group is started once and reused); a pairs step runs ``difftrain distill pairs``' writer
(difftrain/distill/pairs.py) on every rank. What is done with each stage is decided up front, before anything
runs (difftrain/campaign/decide.py); evaluation follows (difftrain/campaign/results.py).
"""
from __future__ import annotations

import argparse
import time

from difftrain.campaign.spec import PAIRS, Campaign, load_campaign, shown
from difftrain.config import ConfigError


def add_campaign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="campaign file (YAML): dir, config, overrides, stages, eval")
    p.add_argument("--dry-run", action="store_true",
                   help="build every stage on the meta device and print the plan: modules, parameters, memory per "
                        "rank, layout, the chain; nothing is trained, no file needs to exist")
    p.add_argument("--rerun", nargs="+", action="extend", default=[], metavar="NAME",
                   help="train these stages again (their folders are moved aside to DIR/NAME.replaced-N)")
    p.add_argument("--only", nargs="+", action="extend", default=[], metavar="NAME",
                   help="run only these stages (the stages they come from must be finished)")
    p.add_argument("--skip-eval", action="store_true", help="train only; no evaluation at the end")
    p.add_argument("--world-size", type=int, help="dry run: ranks to plan for (default: 8 per node x --nodes)")
    p.add_argument("--nodes", type=int, default=1, help="dry run: nodes of 8 ranks (default 1)")
    p.add_argument("--text-dim", type=int, help="dry run: the text encoder's width when its folder is absent and "
                                                "its name is not a known one (MiniLM 384, CLIP-L 768, T5-XXL 4096)")


def _names(c: Campaign, given: list[str], flag: str) -> list[str]:
    for n in given:
        if n not in c.stages:
            raise ConfigError(f"{flag} {n}: no such stage in '{c.path}' (stages: {', '.join(c.stages)})")
    return given


def run_campaign(args) -> None:
    from difftrain.train.supervise import StopSignal

    signals = None if args.dry_run else StopSignal().install()  # first: a signal at any later moment ends cleanly
    try:
        c = load_campaign(args.file)
        rerun, only = _names(c, args.rerun, "--rerun"), _names(c, args.only, "--only")
        if args.dry_run:
            from difftrain.campaign.dryrun import dry_run

            print(dry_run(c, world_size=args.world_size, nodes=args.nodes, text_dim=args.text_dim, rerun=rerun,
                          only=only), flush=True)
            return
        _run(c, rerun, only, not args.skip_eval, signals)
    finally:
        if signals is not None:
            signals.restore()


def _run(c: Campaign, rerun: list[str], only: list[str], evaluate: bool, signals) -> None:
    from types import SimpleNamespace

    from difftrain.campaign.decide import decide
    from difftrain.launch.env import discover, pick_device, shutdown

    env = SimpleNamespace(**vars(discover()))  # rank, world_size, local_rank, launcher (+ device below)
    log = print if env.rank == 0 else (lambda *a, **k: None)
    # every stage's config values before anything runs (the launch checks come per stage: its inputs exist then)
    configs = {n: c.config_for(n) for n in c.training()}
    decisions = decide(c, configs, rerun, only)  # raises the first refusal, before anything is moved or trained
    log(plan_text(c, decisions), flush=True)
    # the process group's device: the first training stage's (its Trainer would start the group on it)
    env.device = pick_device(configs[c.training()[0]].run.device if configs else "auto", env.local_rank)
    try:
        _barrier(env)  # every rank has decided before any writes
        for d in decisions:
            for note in d.notes:
                log(f"campaign: stage '{d.name}': {note}", flush=True)
            if d.action in ("skip", "leave"):
                continue
            _check_signal(signals)
            if d.action == "rerun":
                _move_aside(c, d.name, env, log)
            if c.stages[d.name].kind == PAIRS:
                _pairs(c, d.name, env, log)
            else:
                _train(c, d.name, env, log, signals)
        _check_signal(signals)
        if evaluate and c.eval is not None:
            from difftrain.campaign.results import evaluate_campaign

            evaluate_campaign(c, configs, log=log)
        elif evaluate:
            log(f"campaign: '{c.path}' has no eval section: nothing evaluated", flush=True)
    finally:
        shutdown()


def plan_text(c: Campaign, decisions) -> str:
    width = max(len(n) for n in c.stages)
    lines = [f"campaign {c.path}: {len(c.stages)} stages in {c.dir}"]
    for d in decisions:
        s = c.stages[d.name]
        kind = "pairs" if s.kind == PAIRS else s.stage
        src = f"; from {s.from_}" if s.from_ else ""
        src += f", data from {s.data_from}" if s.data_from else ""
        lines.append(f"  {d.name:<{width}}  {kind:<11} {d.action:<7} {d.why}{src}")
    return "\n".join(lines)


def _check_signal(signals) -> None:
    """Between stages a signal ends the campaign at once (the trainer defers it to a step boundary while it runs)."""
    if signals is None:
        return
    signals.immediate = True
    if signals.signum is not None:
        raise signals.stopped("between campaign stages")


def _barrier(env) -> None:
    import torch.distributed as dist

    if env.world_size > 1:
        _group(env)
        dist.barrier()


def _group(env) -> None:
    """The process group (the first Trainer starts it otherwise; a pairs step or a move may come first)."""
    import torch.distributed as dist

    from difftrain.launch.env import init_distributed

    if env.world_size > 1 and not dist.is_initialized():
        init_distributed(env.device)


def _move_aside(c: Campaign, name: str, env, log) -> None:
    from difftrain.campaign.decide import move_aside

    _barrier(env)  # nobody reads the folder any more
    if env.rank == 0:
        moved = move_aside(c.run_dir(name))
        log(f"campaign: stage '{name}': --rerun: moved {c.run_dir(name)} to {moved}", flush=True)
    _barrier(env)


def _train(c: Campaign, name: str, env, log, signals) -> None:
    from difftrain.campaign.decide import add_wall_time, training_state, write_record
    from difftrain.eval.validate import Validation
    from difftrain.sampling import SampleGrid
    from difftrain.train.trainer import Trainer

    s = c.stages[name]
    cfg = c.config_for(name, world_size=env.world_size)  # now with the launch checks: its inputs exist
    derived = " ".join(shown(k, v) for k, v in c.derived(name))
    log(f"campaign: stage '{name}' ({s.stage}) in {c.run_dir(name)}"
        + (f"; from '{s.from_}'" if s.from_ else "") + (f", data from '{s.data_from}'" if s.data_from else "")
        + (f": {derived}" if derived else ""), flush=True)
    if env.rank == 0 and not training_state(c.run_dir(name), cfg).output:
        write_record(c, name, cfg)  # the inputs it starts from (compared when the campaign is run again)
    trainer = Trainer(cfg, callbacks=[SampleGrid(), Validation()], signals=signals)
    t0 = time.monotonic()
    try:
        out = trainer.fit()
    finally:  # an interrupted launch counts too: the record sums every launch's training time
        if env.rank == 0:
            add_wall_time(c, name, time.monotonic() - t0)
    if out:
        log(f"campaign: stage '{name}' final " + " ".join(f"{k}={v:.5g}" for k, v in out.items() if "/" not in k),
            flush=True)
    del trainer
    _release()


def _pairs(c: Campaign, name: str, env, log) -> None:
    from difftrain.campaign.decide import write_record
    from difftrain.distill.pairs import PairWriter, write_pairs
    from difftrain.eval.generator import load_generator

    s, r = c.stages[name], c.stages[name].request
    teacher, out = c.run_dir(s.from_), c.run_dir(name)
    log(f"campaign: stage '{name}' (pairs) in {out}: {r['count']} pairs of teacher '{s.from_}'", flush=True)
    _group(env)
    g = load_generator(teacher, env.device)
    writer = PairWriter(g, teacher, r["count"], solver=r["solver"], steps=r["steps"], guidance=r["guidance"],
                        batch=r["batch"], shard_size=r["shard_size"], seed=r["seed"], dtype=r["dtype"],
                        prompts=r["prompts"], captions_from=r["captions_from"])
    writer.prepare(out, env.rank)  # refuses a folder of another request (the decision checked it already)
    _barrier(env)
    if env.rank == 0:
        write_record(c, name, None)
    res = write_pairs(writer, out, env.rank, env.world_size, progress=True)
    _barrier(env)  # every rank's shards are written before the next stage reads them
    log(f"campaign: stage '{name}': {writer.shards} shards ({writer.count} pairs, {writer.solver} "
        f"{writer.steps} steps, guidance {writer.guidance:g}); rank 0 wrote {res['written']} pairs", flush=True)
    del writer, g
    _release()


def _release() -> None:
    """Give a finished stage's memory back before the next stage builds its modules."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

