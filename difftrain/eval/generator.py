"""What produces samples: a run's EMA weights or an export, with its diffusion, conditioner and decoder.

``load_generator(path)`` takes a run dir (``config.yaml`` + checkpoints: the newest complete checkpoint's
EMA weights) or a folder written by ``difftrain export`` (diffusers layout + ``difftrain.json``), so
students, teachers and exported models are evaluated by one path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from difftrain.config import Config, ConfigError, DiffusionConfig, EncodersConfig
from difftrain.diffusion.samplers import SAMPLERS, time_grid

ALIASES = {"dpmpp2m": "dpmpp_2m", "dpm++2m": "dpmpp_2m"}


@dataclasses.dataclass
class Generator:
    name: str
    model: nn.Module
    acfg: object  # the architecture config
    step: int
    diffusion: object
    conditioner: object
    vae: nn.Module
    cfg: Config
    device: torch.device
    sampling: object = None  # SamplingDefaults: how the model samples unless told otherwise (its stage's)
    fingerprint: str = ""  # of the weights (a run's checkpoint metadata; an export's files): evaluation cache keys

    @property
    def cond(self) -> str:
        return self.cfg.model.cond


def sampler_name(name: str) -> str:
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{name}'; valid: {', '.join(SAMPLERS)} (dpmpp2m = dpmpp_2m)")
    return name


def count_nfe(sampler: str, steps: int, path) -> int:
    """Denoiser evaluations per sample: the sampler run once on a 1-pixel input, counting calls."""
    calls = [0]

    def fn(x, t):
        calls[0] += 1
        return torch.zeros_like(x)

    SAMPLERS[sampler](fn, torch.ones(1, 1, 1, 1, dtype=torch.float64), time_grid(steps, 1.0, 0.0), path=path)
    return calls[0]


def load_run(run_dir: str | Path, device: torch.device, merge: bool = True) -> Generator:
    """A run's served module with its EMA weights, ready to sample; ``merge=False`` leaves its model changes
    (``adapt``) applied, unmerged (``load_run_weights``)."""
    from difftrain.train.build import read_model_config
    from difftrain.train.sources import load_run_weights

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"'{run}' is not a run dir (no config.yaml)")
    arch, acfg = read_model_config(run)
    from difftrain.models import registry

    model = registry.materialize(registry.build(arch, acfg), device, seed=0)
    step = load_run_weights(run, model, which="ema", merge=merge)  # the served module of the run's stage
    from difftrain.train.sources import run_config
    from difftrain.train.stages import STAGES

    cfg = run_config(run, step)
    from difftrain.train.checkpoint import read_train_state, step_dir
    from difftrain.train.stages.base import SamplingDefaults

    state = read_train_state(step_dir(run / "checkpoints", step))
    saved = state.get("sampling")  # resolved by the trainer (it may have read the stage's teacher or pairs)
    how = SamplingDefaults(**saved) if isinstance(saved, dict) else STAGES[cfg.stage].sampling(cfg)
    g = _assemble(run.name, cfg, model.eval(), acfg, step, device, how)
    g.fingerprint = hashlib.sha256((step_dir(run / "checkpoints", step) / ".metadata").read_bytes()).hexdigest()[:16]
    return g


def load_export(folder: str | Path, device: torch.device) -> Generator:
    from difftrain.models import registry

    folder = Path(folder)
    meta = json.loads((folder / "difftrain.json").read_text())
    if "arch" not in meta:
        raise ConfigError(f"'{folder}/difftrain.json' has no 'arch': re-export it with this version of difftrain")
    cls = registry.arch_class(meta["arch"])
    acfg = cls.config_class(**meta["model"])
    if "served" in meta:  # no model here that difftrain serves (a torchao scheme with activations: DIR/torchao)
        raise ConfigError(f"'{folder}' holds no model difftrain serves: {meta['served']} (the call in its "
                          "difftrain.json 'torchao'); sample or evaluate the run itself")
    if "quantized" in meta:  # a QAT run's export: the integer model in its quantized/ (quant/serve.py)
        from difftrain.quant.serve import load_quantized

        model = load_quantized(folder, device)
    else:
        model = registry.materialize(registry.build(meta["arch"], acfg), device, seed=0)
        # a pipeline folder (``export --pipeline``) holds the model in its transformer/
        weights = folder / "transformer" if (folder / "model_index.json").is_file() else folder
        model.load_state_dict(model.load_diffusers(weights), strict=True)
        from difftrain.finetune.served import load_served

        load_served(model, folder, device)  # a ControlNet's branch, a T2I-Adapter: when the export has them
    cfg = Config(diffusion=DiffusionConfig(**meta["diffusion"]), encoders=EncodersConfig(**meta["encoders"]))
    cfg.model.cond = "text" if acfg.text_dim > 0 else "class" if acfg.num_classes > 0 else "none"
    cfg.model.num_classes = acfg.num_classes
    cfg.data.channels = acfg.in_channels if not cfg.encoders.vae else 3
    from difftrain.train.stages.base import SamplingDefaults

    sampling = meta.get("sampling", {})  # how the exported model samples (its stage's sampler, steps, CFG scale)
    how = SamplingDefaults(sampling.get("sampler", cfg.run.sample_sampler),
                           int(sampling.get("steps", cfg.run.sample_steps)),
                           float(sampling.get("guidance", cfg.run.sample_guidance)))
    g = _assemble(folder.name, cfg, model.eval(), acfg, int(meta.get("step", 0)), device, how)
    from difftrain.train.sources import Source

    g.fingerprint = Source("export", folder, None).fingerprint()["sha256"]
    return g


def _assemble(name, cfg, model, acfg, step, device, how) -> Generator:
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.train.build import build_encoders
    from difftrain.models.conditioner import Conditioner

    text, vae = build_encoders(cfg, device)
    diffusion = build_diffusion(cfg.diffusion, pixel_space=not cfg.encoders.vae)
    return Generator(name, model, acfg, step, diffusion, Conditioner(cfg.model, text, device, guidance_input=getattr(acfg, "guidance_embed", False)), vae, cfg, device, how)


def load_generator(path: str | Path, device: torch.device | None = None) -> Generator:
    """A run dir or an export folder -> :class:`Generator` on ``device`` (default: CUDA if present)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(path)
    if (p / "config.yaml").is_file():
        return load_run(p, device)
    if (p / "difftrain.json").is_file():
        return load_export(p, device)
    raise ConfigError(f"'{p}' is neither a run dir (config.yaml) nor a difftrain export (difftrain.json)")
