"""A campaign's evaluation: every finished training stage through ``difftrain.eval.evaluate.evaluate``, into one
table (``DIR/results.md``), one JSON (``DIR/results.json``) and an FID-vs-NFE plot (``DIR/fid_vs_nfe.png``).

What is evaluated (each at the eval section's ``samples`` against ``ref`` with ``extractor``; CFG scale: the
model's own unless ``eval.guidance``):

* a ``pretrain`` stage (the teacher) over the NFE list with each of ``eval.teacher_samplers``; a sampler whose NFE
  per step is not 1 (Heun: 2 steps - 1) at the most steps that stay within each NFE (duplicates dropped), so
  its points sit at the NFE it really costs (``generator.count_nfe``);
* a reflow stage without a grid (k-RF) over the NFE list with Euler;
* a consistency student with its own multistep sampler at each NFE of the list up to 4;
* every other student at its own sampler and step count (``Stage.sampling``: a progressive student of N steps
  with DDIM at N, a reflow stage with ``grid: k`` with Euler at k).

``evaluate`` stores each setting's samples' features in chunks under ``DIR/NAME/eval/SAMPLER/`` (keyed by the
checkpoint step), so a rerun of the campaign reads them back instead of sampling again, and a stage trained again
(``--rerun``) takes its old evaluations with it when its folder is moved aside.
"""
from __future__ import annotations

import json

from difftrain.campaign.spec import Campaign

COLUMNS = [("stage", "stage"), ("kind", "kind"), ("sampler", "sampler"), ("steps", "steps"), ("nfe", "NFE"),
           ("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"),
           ("class_acc", "class accuracy")]


def steps_for_nfe(sampler: str, nfes: list[int], path) -> list[int]:
    """For each NFE, the most steps of ``sampler`` costing at most that many denoiser calls; duplicates dropped."""
    from difftrain.eval.generator import count_nfe

    out = []
    for n in nfes:
        best, s = None, 1
        while s <= n and count_nfe(sampler, s, path) <= n:  # NFE grows with the steps
            best, s = s, s + 1
        if best is not None and best not in out:
            out.append(best)
    return out


def kind_of(cfg) -> str:
    from difftrain.train.stages import stage_args

    if cfg.stage == "reflow" and stage_args(cfg).grid:
        return f"reflow (grid {stage_args(cfg).grid})"
    return cfg.stage


def settings(cfg, ev) -> list[tuple[str | None, list[int] | None]]:
    """(sampler, steps) settings of one stage; None: the model's own (its stage's sampler and steps)."""
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.train.stages import stage_args

    path = build_diffusion(cfg.diffusion, pixel_space=not cfg.encoders.vae).path
    if cfg.stage == "pretrain":
        return [(s, steps_for_nfe(s, ev.nfe, path)) for s in ev.teacher_samplers]
    if cfg.stage == "reflow" and not stage_args(cfg).grid:
        return [("euler", steps_for_nfe("euler", ev.nfe, path))]
    if cfg.stage == "consistency":  # a few-step sampler: its own, at each NFE up to 4 (one evaluation per step)
        from difftrain.train.stages import STAGES

        return [(STAGES["consistency"].sampling(cfg).sampler, [n for n in ev.nfe if n <= 4] or [1])]
    return [(None, None)]


def evaluate_campaign(c: Campaign, configs: dict, log=print) -> list[dict]:
    """Evaluate every finished training stage (collective: every rank calls it); rank 0 writes the results."""
    from difftrain.campaign.decide import training_state
    from difftrain.eval.evaluate import evaluate, final_line
    from difftrain.launch.env import discover

    ev, rank = c.eval, discover().rank
    rows: list[dict] = []
    for name in c.training():
        cfg = configs[name]
        st = training_state(c.run_dir(name), cfg)
        if not st.finished:
            log(f"campaign: stage '{name}' not evaluated: {st.detail}", flush=True)
            continue
        for sampler, steps in settings(cfg, ev):
            got = evaluate([str(c.run_dir(name))], ev.ref, ev.extractor, c.run_dir(name) / "eval" / (sampler or "own"),
                           num=ev.samples, ref_num=ev.ref_samples, steps=steps, samplers=[sampler] if sampler else None,
                           guidance=ev.guidance, seed=ev.seed, batch=ev.batch, cache_dir=ev.cache_dir,
                           progress=True, log=lambda line: log(f"campaign: eval {line}", flush=True))
            rows += [{"stage": name, "kind": kind_of(cfg), **r} for r in got]
    if rank == 0 and rows:
        write_results(c, rows)
        log(table(rows), flush=True)
        log(f"campaign: results in {c.dir}/results.json, results.md, fid_vs_nfe.png; last: {final_line(rows[-1])}",
            flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if k != "class_acc" or any("class_acc" in r for r in rows)]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k, "-")) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def best_lines(rows: list[dict]) -> list[str]:
    """Each teacher's (pretrain stage's) best FID over its samplers and NFEs, and each student's FID against it."""
    out = []
    teachers = {r["stage"] for r in rows if r["kind"] == "pretrain"}
    for t in sorted(teachers):
        best = min((r for r in rows if r["stage"] == t), key=lambda r: r["fid"])
        out.append(f"- best FID of '{t}': {best['fid']:.4g} ({best['sampler']}, NFE {best['nfe']})")
        for r in rows:
            if r["stage"] not in teachers:
                out.append(f"  - '{r['stage']}' at NFE {r['nfe']}: FID {r['fid']:.4g} = {r['fid'] / best['fid']:.3g}x")
    return out


def write_results(c: Campaign, rows: list[dict]) -> None:
    from difftrain.eval.plots import plot_fid_vs_nfe

    c.dir.mkdir(parents=True, exist_ok=True)
    (c.dir / "results.json").write_text(json.dumps(rows, indent=1))
    ev = c.eval
    how = "each model's own" if ev.guidance is None else f"{ev.guidance:g}"
    head = (f"# Campaign {c.path}\n\n{ev.samples} samples per setting against `{ev.ref}` ({rows[0]['extractor']} "
            f"features); CFG scale: {how}.\n\n")
    (c.dir / "results.md").write_text(head + table(rows) + "\n\n" + "\n".join(best_lines(rows)) + "\n")
    plot_fid_vs_nfe(rows, c.dir / "fid_vs_nfe.png", title=f"FID vs NFE: {c.path.stem}",
                    series=lambda r: f"{r['stage']} ({r['kind']}) / {r['sampler']}")
