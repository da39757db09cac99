"""``difftrain`` command line: data | train | sample | eval | export (``python -m difftrain`` is the same).

    difftrain data demo --out data/digits             # [--video: moving digits as mp4] [--style bold]
    difftrain data shards photos/ --out data/photos   # image folder + captions -> img2dataset layout
    difftrain data stat "data/photos/{00000..00003}.tar" data.image_size=256
    torchrun --nproc_per_node=2 -m difftrain data encode configs/demo.yaml --out data/digits_latent
    torchrun --nproc_per_node=2 -m difftrain train configs/demo.yaml run.dir=runs/demo optim.lr=3e-4
    difftrain launch configs/demo.yaml --target slurm --nodes 4 --gpus-per-node 8 --out job.sbatch  # or torchrun ...
    torchrun --nproc_per_node=2 -m difftrain distill pairs runs/demo --out data/pairs --count 4096  # reflow pairs
    difftrain sample runs/demo --num 64 --steps 50 --prompt "a handwritten digit 7" --out out/
    difftrain eval runs/demo --ref "data/digits/val/{00000..00000}.tar" --extractor digits --steps 4,8,16
    difftrain export runs/demo --out export/demo                # [--pipeline: a stock diffusers pipeline folder]
    torchrun --nproc_per_node=2 -m difftrain campaign configs/campaigns/digits.yaml   # [--dry-run] [--rerun NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difftrain.config import ConfigError


def _cmd_demo(args) -> None:
    if args.video and args.style != "plain":
        raise ConfigError(f"--style {args.style} draws the digit images; the moving digits (--video) have none")
    if args.video:
        from difftrain.data.moving_digits import write_moving_digits

        info = write_moving_digits(args.out, size=args.image_size or 32, seed=args.seed)
    else:
        from difftrain.data.demo import write_digits

        info = write_digits(args.out, image_size=args.image_size or 16, seed=args.seed, style=args.style)
    print(json.dumps(info, indent=1))


def _lazy(module: str, fn: str):
    def run(args):
        import importlib

        return getattr(importlib.import_module(module), fn)(args)

    return run


def _cmd_train(args) -> None:
    from difftrain.config_checks import load_config

    from difftrain.train.supervise import StopSignal

    signals = StopSignal().install()  # first: a signal at any later moment ends the run cleanly
    from difftrain.launch.env import discover, shutdown

    # every config error before any process group: values, and the layout and files for this launch's world size
    cfg = load_config(args.config, args.overrides, world_size=discover().world_size)
    from difftrain.eval.validate import Validation
    from difftrain.sampling import SampleGrid
    from difftrain.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, callbacks=[SampleGrid(), Validation()], signals=signals)
        out = trainer.fit()
        if trainer.rank == 0 and out:
            print("final " + " ".join(f"{k}={v:.5g}" for k, v in out.items() if "/" not in k), flush=True)
    finally:
        shutdown()


def _cmd_sample(args) -> None:
    import numpy as np
    import torch

    from difftrain.sampling import default_conditions, generate, grid, sample_shape, save_png

    from difftrain.eval.generator import load_generator, sampler_name

    g = load_generator(args.run)
    captions, labels = default_conditions(g.cond, args.num, args.prompt or g.cfg.run.sample_prompts,
                                          g.cfg.model.num_classes)
    if args.label is not None:
        labels = torch.full((args.num,), args.label)
    how = g.sampling  # the run's own (its stage's) sampler, steps and CFG scale unless the flags say otherwise
    control = None
    if args.control:
        from difftrain.config import ConfigError
        from difftrain.finetune.controlnet import control_input

        if all(getattr(g.model, m, None) is None for m in ("control", "adapter")):
            raise ConfigError(f"--control: '{args.run}' has no ControlNet or T2I-Adapter (config adapt: "
                              "[{kind: controlnet}] or [{kind: t2i_adapter}])")
        h, w = (side * g.vae.downsample_factor for side in sample_shape(g.acfg)[-2:])  # the run's pixels
        space = getattr(getattr(g.model, "control", None), "space", "latents")  # the UNet's ControlNet: pixels
        control = control_input(args.control, (h, w), g.cfg.data.channels, g.vae, g.device, space)
    images = generate(g.model, g.diffusion, g.conditioner, g.vae, n=args.num, shape=sample_shape(g.acfg),
                      steps=args.steps or how.steps, sampler=sampler_name(args.sampler or how.sampler),
                      guidance=how.guidance if args.guidance is None else args.guidance, seed=args.seed,
                      device=g.device, captions=captions, labels=labels, progress=True, control=control,
                      control_scale=args.control_scale, control_window=(args.control_start, args.control_end))
    step = g.step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images=images)
    save_png(grid(images), out / "grid.png")
    print(f"wrote {len(images)} samples of step {step} to {out}/samples.npz and {out}/grid.png")


def _cmd_export(args) -> None:
    import copy
    import dataclasses

    import torch

    from difftrain.config import to_dict

    from difftrain.eval.generator import load_run
    from difftrain.train.build import read_model_config

    from difftrain.finetune.adapt import changes_of, merge_changes
    from difftrain.finetune.lora import LoRA

    g = load_run(args.run, torch.device("cpu"), merge=False)  # read once: the adapters as trained, then merged
    changes = changes_of(g.cfg)
    refusal = next((r for r in (c.export_refusal() for c in changes) if r), None)
    if refusal:
        from difftrain.models.dit_export import ExportError

        raise ExportError(f"cannot export {args.run}: {refusal}")
    unmerged = copy.deepcopy(g.model) if any(isinstance(c, LoRA) for c in changes) else None
    if g.cfg.diffusion.target == "x_eps":
        from difftrain.models.dit_export import ExportError

        raise ExportError(f"cannot export {args.run}: diffusion.target=x_eps (x and eps predictions merged by the "
                          "noise level) has no diffusers scheduler; train the student with target x or v to export it")
    from difftrain.quant.export import export_quantised

    # a QAT run's integers (DIR/quantized) or torchao folder (DIR/torchao), read from the prepared model
    quant_meta, changes_left, no_root, quant_lines = export_quantised(g.model, changes, args.out, args.pipeline, g.step)
    merge_changes(g.model, changes_left)
    from difftrain.models.scheduler_export import write_scheduler

    state = {k: v.detach() for k, v in g.model.state_dict().items()}
    pipeline = controlnet = None
    if no_root:  # activation quantisers: the served model is DIR/quantized or DIR/torchao; an earlier root model goes
        cls_name = None
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            (Path(args.out) / f).unlink(missing_ok=True)
        scheduler = write_scheduler(args.out, g.diffusion, g.sampling.sampler, g.sampling.steps)
    elif args.pipeline:  # a whole stock pipeline folder (transformer/, vae/, text_encoder/, ...), or one line why not
        from difftrain.models.pipeline_export import export_pipeline

        cls_name, scheduler, pipeline = export_pipeline(g, state, args.out)
    else:
        (Path(args.out) / "model_index.json").unlink(missing_ok=True)  # an earlier --pipeline export's: now stale
        from difftrain.finetune.served import save_served

        cls_name, controlnet = save_served(g.model, state, args.out)  # a ControlNet's / T2I-Adapter's beside the base
        # how the served model samples, as a stock diffusers scheduler (DIR/scheduler), or the reason there is none
        scheduler = write_scheduler(args.out, g.diffusion, g.sampling.sampler, g.sampling.steps)
    meta = {"step": g.step, "diffusers_class": cls_name, "timestep_scale": 1000.0, "arch": read_model_config(args.run)[0],
            "diffusion": to_dict(g.cfg.diffusion), "encoders": to_dict(g.cfg.encoders),
            "stage": g.cfg.stage,
            "sampling": {"guidance": g.sampling.guidance, "steps": g.sampling.steps, "sampler": g.sampling.sampler},
            "scheduler": scheduler,
            "model": dataclasses.asdict(g.acfg)}
    if pipeline:
        meta["pipeline"] = pipeline
    from difftrain.finetune.lora_export import export_run_adapters

    lora = export_run_adapters(unmerged, changes, args.run, g.step, g.cfg, args.out)  # for its base (lora.base)
    if lora:
        meta["lora"] = lora
    meta.update(quant_meta)
    (Path(args.out) / "difftrain.json").write_text(json.dumps(meta, indent=1))
    print(f"exported EMA weights of step {g.step} as diffusers {cls_name} to {args.out}" if cls_name else
          f"exported EMA weights of step {g.step} to {args.out}")
    for line in quant_lines:
        print(line)
    if pipeline:
        print(f"pipeline: DiffusionPipeline.from_pretrained({str(args.out)!r}) -> diffusers {pipeline['class']}; "
              f"call it with {', '.join(f'{k}={v!r}' for k, v in pipeline['call'].items())}")
        if pipeline["captions"] != "any":
            print("pipeline: the tokenizer is cased and the pipeline lower-cases captions: only lower-case captions "
                  "give difftrain sample's images")
        if not pipeline["deterministic"]:
            print(f"pipeline: {g.sampling.sampler} draws fresh noise each step from the pipeline's generator: the "
                  "same distribution as difftrain sample, not the same images")
    for name, a in (lora or {}).get("adapters", {}).items():
        base = lora["base"]["source"] if lora["base"] else "the run's seeded init (no init_from)"
        print(f"LoRA adapter '{name}' ({a['loader']}, {a['bytes'] / 2**20:.2f} MiB) in {Path(args.out) / a['path']}, "
              f"for the base {base}")
    if lora and "not_written" in lora:
        print(f"no LoRA adapter files written: {lora['not_written']}")
    if controlnet:
        print(controlnet)
    how = f"{g.sampling.sampler}, {g.sampling.steps} steps"
    if scheduler["class"]:
        print(f"scheduler: diffusers {scheduler['class']} ({how}) in {Path(args.out) / scheduler['subfolder']}")
    else:
        print(f"no diffusers scheduler written ({how}): {scheduler['reason']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difftrain", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="write, check and pre-encode webdataset shards")
    dsub = d.add_subparsers(dest="what", required=True)
    dd = dsub.add_parser("demo", help="the demo data: scikit-learn digits as img2dataset-layout shards")
    dd.add_argument("--out", required=True)
    dd.add_argument("--video", action="store_true", help="moving digits as mp4 (video2dataset layout)")
    dd.add_argument("--image-size", type=int, help="pixels (default: 16, video 32)")
    dd.add_argument("--seed", type=int, default=0)
    from difftrain.data.demo import STYLES

    dd.add_argument("--style", default="plain", choices=sorted(STYLES),
                    help="how the digits are drawn (bold: thickened strokes, a new style to fine-tune to)")
    dd.set_defaults(fn=_cmd_demo)
    from difftrain.data.encode import add_encode_args
    from difftrain.data.stat import add_stat_args
    from difftrain.data.writers import add_shards_args

    for name, module, add, fn, help_ in (
            ("shards", "difftrain.data.writers", add_shards_args, "run_shards",
             "an image folder with captions -> shards in the img2dataset layout"),
            ("stat", "difftrain.data.stat", add_stat_args, "run_stat",
             "stream a shard spec through the loader: skips per reason, samples/s"),
            ("encode", "difftrain.data.encode", add_encode_args, "run_encode",
             "pre-encode shards with the frozen VAE and text encoder (under torchrun)")):
        sp = dsub.add_parser(name, help=help_)
        add(sp)
        sp.set_defaults(fn=_lazy(module, fn))

    ds = sub.add_parser("distill", help="distillation tools: a teacher's (noise, sample) pairs for reflow")
    dssub = ds.add_subparsers(dest="what", required=True)
    from difftrain.distill.pairs import add_pairs_args

    sp = dssub.add_parser("pairs", help="integrate a teacher's ODE from keyed noise; write (z, x^) pair shards "
                                        "(under torchrun)")
    add_pairs_args(sp)
    sp.set_defaults(fn=_lazy("difftrain.distill.pairs", "run_pairs"))

    t = sub.add_parser("train", help="train (single process, or under torchrun / srun / mpirun)")
    t.add_argument("config", help="YAML config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    t.set_defaults(fn=_cmd_train)

    la = sub.add_parser("launch", help="print (or --out: write) the job script that runs train on N nodes x G "
                                       "processes under torchrun, sbatch/srun, deepspeed or mpirun")
    from difftrain.launch.jobs import add_launch_args

    add_launch_args(la)
    la.set_defaults(fn=_lazy("difftrain.launch.jobs", "run_launch"))

    s = sub.add_parser("sample", help="sample images from a run's EMA weights")
    s.add_argument("run")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, help="sampler steps (default: the run's, e.g. a student's own step count)")
    s.add_argument("--prompt", action="append", help="caption (repeat for several; cycled)")
    s.add_argument("--label", type=int, help="class label for class-conditional models")
    s.add_argument("--sampler", help="euler | heun | ddim | dpmpp_2m (default: the run's)")
    s.add_argument("--guidance", type=float, help="CFG scale w: uncond + w*(cond - uncond) (default: the run's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--control", help="control image for a ControlNet / T2I-Adapter run (PNG/JPEG; resized to the "
                   "run's size)")
    s.add_argument("--control-scale", type=float, default=1.0,
                   help="ControlNet / T2I-Adapter conditioning scale (0: the base)")
    s.add_argument("--control-start", type=float, default=0.0, help="first fraction of the steps with control")
    s.add_argument("--control-end", type=float, default=1.0, help="last fraction of the steps with control")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_cmd_sample)

    from difftrain.eval.evaluate import add_eval_args

    v = sub.add_parser("eval", help="FID / KID / precision-recall (and class accuracy) of samples; NFE sweeps")
    add_eval_args(v)
    v.set_defaults(fn=_lazy("difftrain.eval.evaluate", "run_eval"))

    pl = sub.add_parser("plan", help="pipeline/data-parallel plan for a cluster from FLOP-based costs (simulated)")
    from difftrain.parallelism.pipeline.plan import add_plan_args

    add_plan_args(pl)
    pl.set_defaults(fn=_lazy("difftrain.parallelism.pipeline.plan", "run_plan"))

    cp = sub.add_parser("campaign", help="run named stages chained by from: (teacher, pairs, students), then "
                                         "evaluate them into one table (under torchrun or one process)")
    from difftrain.campaign.runner import add_campaign_args

    add_campaign_args(cp)
    cp.set_defaults(fn=_lazy("difftrain.campaign.runner", "run_campaign"))

    e = sub.add_parser("export", help="export EMA weights as a diffusers model folder")
    e.add_argument("run")
    e.add_argument("--out", required=True)
    e.add_argument("--pipeline", action="store_true",
                   help="a whole diffusers pipeline folder (model_index.json, transformer, vae, text encoder, "
                        "tokenizer, scheduler) for a latent text DiT; refused in one line where none fits")
    e.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> None:
    from difftrain.errors import DifftrainError, say

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        say(f"difftrain: error: {e}")
        sys.exit(2)
    except DifftrainError as e:
        say(e.headline())
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
