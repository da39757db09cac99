"""``difftrain`` command line: data | train | sample | export (``python -m difftrain`` is the same).

    difftrain data demo --out data/digits
    torchrun --nproc_per_node=2 -m difftrain train configs/demo.yaml run.dir=runs/demo optim.lr=3e-4
    difftrain sample runs/demo --num 64 --steps 50 --prompt "a handwritten digit 7" --out out/
    difftrain export runs/demo --out export/demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difftrain.config import ConfigError


def _cmd_data(args) -> None:
    if args.what == "demo":
        from difftrain.data.demo import write_digits

        info = write_digits(args.out, image_size=args.image_size, seed=args.seed)
        print(json.dumps(info, indent=1))


def _cmd_train(args) -> None:
    from difftrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before any process group
    from difftrain.launch.env import shutdown
    from difftrain.sampling import SampleGrid
    from difftrain.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, callbacks=[SampleGrid()])
        out = trainer.fit()
        if trainer.rank == 0 and out:
            print("final " + " ".join(f"{k}={v:.5g}" for k, v in out.items() if "/" not in k), flush=True)
    finally:
        shutdown()


def _load_run(run_dir: str):
    import torch

    from difftrain.config import load_config
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.train.build import build_encoders, load_run_weights, read_model_config
    from difftrain.train.stages.pretrain import Conditioner
    from difftrain.models import registry

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"'{run}' is not a run dir (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch, acfg = read_model_config(run)
    model = registry.materialize(registry.build(arch, acfg), device, seed=0)
    step = load_run_weights(run, model, which="ema")
    text, vae = build_encoders(cfg, device)
    return cfg, model.eval(), acfg, step, build_diffusion(cfg.diffusion), Conditioner(cfg, text, device), vae, device


def _cmd_sample(args) -> None:
    import numpy as np
    import torch

    from difftrain.sampling import default_conditions, generate, grid, save_png

    cfg, model, acfg, step, diffusion, conditioner, vae, device = _load_run(args.run)
    captions, labels = default_conditions(cfg.model.cond, args.num, args.prompt or cfg.run.sample_prompts,
                                          cfg.model.num_classes)
    if args.label is not None:
        labels = torch.full((args.num,), args.label)
    images = generate(model, diffusion, conditioner, vae, n=args.num,
                      shape=(acfg.in_channels, acfg.image_size, acfg.image_size), steps=args.steps,
                      sampler=args.sampler, guidance=args.guidance, seed=args.seed, device=device,
                      captions=captions, labels=labels, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images=images)
    save_png(grid(images), out / "grid.png")
    print(f"wrote {len(images)} samples of step {step} to {out}/samples.npz and {out}/grid.png")


def _cmd_export(args) -> None:
    import dataclasses

    from difftrain.config import to_dict

    cfg, model, acfg, step, *_ = _load_run(args.run)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    cls_name = model.save_diffusers(state, args.out)
    meta = {"step": step, "diffusers_class": cls_name, "timestep_scale": 1000.0,
            "diffusion": to_dict(cfg.diffusion), "encoders": to_dict(cfg.encoders),
            "model": dataclasses.asdict(acfg)}
    (Path(args.out) / "difftrain.json").write_text(json.dumps(meta, indent=1))
    print(f"exported EMA weights of step {step} as diffusers {cls_name} to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difftrain", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="write data sets as webdataset shards")
    d.add_argument("what", choices=["demo"])
    d.add_argument("--out", required=True)
    d.add_argument("--image-size", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_data)

    t = sub.add_parser("train", help="train (single process, or under torchrun / srun / mpirun)")
    t.add_argument("config", help="YAML config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="sample images from a run's EMA weights")
    s.add_argument("run")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--prompt", action="append", help="caption (repeat for several; cycled)")
    s.add_argument("--label", type=int, help="class label for class-conditional models")
    s.add_argument("--sampler", default="dpmpp_2m")
    s.add_argument("--guidance", type=float, default=3.0, help="CFG scale w: uncond + w*(cond - uncond)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("export", help="export EMA weights as a diffusers model folder")
    e.add_argument("run")
    e.add_argument("--out", required=True)
    e.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"difftrain: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
