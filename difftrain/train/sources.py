"""Where a module's weights come from: config keys ``init_from`` and a stage's ``stage_args.teacher``.

A source is written as one string:

    RUN@ema | RUN@raw    a run directory's newest complete checkpoint: the served module's EMA or its raw weights
                         (which one is always said: a run holds both and they differ)
    FOLDER               a ``difftrain export`` folder (``difftrain.json``) or a diffusers model folder

Nothing is unpickled: checkpoints are read through the restricted DCP reader (train/checkpoint.py) and folders as
safetensors + JSON. A run is read with DCP straight into the target module, so a sharded (FSDP2) module loads its
shards without the whole model ever being assembled. :meth:`Source.fingerprint` identifies the weights (a frozen
teacher is recorded in a checkpoint by path and fingerprint, not copied; a resume refuses a changed teacher).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.train import checkpoint as ckpt

WEIGHTS = ("ema", "raw")


@dataclass(frozen=True)
class Source:
    key: str  # the config key it came from (named in every error)
    path: Path
    weights: str | None  # ema | raw for a run directory; None for a folder

    @classmethod
    def parse(cls, key: str, text: str) -> "Source":
        """Check ``text`` without reading a tensor: a run directory with a complete checkpoint and the weights chosen,
        or a model folder whose headers read (``build.check_init_from``)."""
        path, sep, which = text.rpartition("@") if "@" in text else (text, "", None)
        p = Path(path)
        if sep:
            if which not in WEIGHTS:
                raise ConfigError(f"config key '{key}' = '{text}': after '@' say which weights, "
                                  f"{' or '.join(WEIGHTS)}")
            if not (p / "checkpoints").is_dir():
                raise ConfigError(f"config key '{key}' = '{text}': '{path}' is not a run directory (no checkpoints/)")
            if ckpt.latest_checkpoint(p / "checkpoints") is None:
                raise ConfigError(f"config key '{key}' = '{text}': run '{path}' has no complete checkpoint")
            return cls(key, p, which)
        if (p / "checkpoints").is_dir():
            raise ConfigError(f"config key '{key}' = '{text}' is a run directory: say which weights, "
                              f"'{text}@ema' or '{text}@raw'")
        from difftrain.train.build import check_init_from

        try:
            check_init_from(text)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key 'init_from'", f"config key '{key}'")) from None
        return cls(key, p, None)

    @property
    def is_run(self) -> bool:
        return self.weights is not None

    def __str__(self) -> str:
        return f"{self.path}@{self.weights}" if self.is_run else str(self.path)

    def model_config(self):
        """(arch, architecture config) of the weights: a run's ``model/config.json``, our export's
        ``difftrain.json``; None for a diffusers folder (the run's own architecture must fit)."""
        from difftrain.models import registry
        from difftrain.train.build import read_model_config

        if self.is_run:
            return read_model_config(self.path)
        meta_file = self.path / "difftrain.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            if "arch" in meta and "model" in meta:
                return meta["arch"], registry.arch_class(meta["arch"]).config_class(**meta["model"])
        return None

    def config(self):
        """The run config the weights were trained with (a run's newest checkpoint's; an export's sections as
        ``generator.load_export`` rebuilds them); None for a diffusers folder."""
        if self.is_run:
            step = ckpt.read_train_state(ckpt.latest_checkpoint(self.path / "checkpoints"))["step"]
            return run_config(self.path, int(step))
        if (self.path / "difftrain.json").is_file():
            from difftrain.config import Config, DiffusionConfig

            meta = json.loads((self.path / "difftrain.json").read_text())
            return Config(stage=meta.get("stage", "pretrain"), diffusion=DiffusionConfig(**meta["diffusion"]))
        return None

    @property
    def adapted(self) -> bool:
        """Whether the weights are a run trained with model changes (``adapt``): read whole, then merged."""
        return self.is_run and bool(self.config().adapt)

    def sampling(self, default_guidance: float):
        """How the weights sample (``SamplingDefaults``): a run's newest checkpoint's saved sampling, an export's
        ``difftrain.json`` sampling; for a diffusers folder (or a run saved before checkpoints kept it) the run config's
        ``run.sample_*`` with ``default_guidance``."""
        from difftrain.train.stages.base import SamplingDefaults

        if self.is_run:
            saved = ckpt.read_train_state(ckpt.latest_checkpoint(self.path / "checkpoints")).get("sampling")
        elif (self.path / "difftrain.json").is_file():
            saved = json.loads((self.path / "difftrain.json").read_text()).get("sampling")
        else:
            saved = None
        if isinstance(saved, dict):
            return SamplingDefaults(saved["sampler"], int(saved["steps"]), float(saved["guidance"]))
        cfg = self.config()
        if cfg is None:
            return SamplingDefaults("dpmpp_2m", 25, default_guidance)
        return SamplingDefaults(cfg.run.sample_sampler, cfg.run.sample_steps, cfg.run.sample_guidance)

    def load(self, module: nn.Module) -> int:
        """Read the weights into ``module`` (plain or sharded: a run is read by DCP into its own tensors). Returns
        the checkpoint's step (0 for a folder)."""
        if self.is_run:
            from difftrain.train.build import load_run_weights

            return load_run_weights(self.path, module, which="ema" if self.weights == "ema" else "model")
        from difftrain.train.build import load_weights_only

        try:
            load_weights_only(module, str(self.path))
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key 'init_from'", f"config key '{self.key}'")) from None
        return 0

    def fingerprint(self) -> dict:
        """``{"source", "step", "sha256"}``: for a run, its newest complete checkpoint's step and a hash of its DCP
        ``.metadata`` and train state; for a folder, a hash of its JSON files and every weight file's size and
        safetensors header. Cheap (no tensor is read) and changed by any other checkpoint or file."""
        h = hashlib.sha256()
        step = 0
        if self.is_run:
            d = ckpt.latest_checkpoint(self.path / "checkpoints")
            state = ckpt.read_train_state(d)
            step = int(state.get("step", 0))
            h.update((d / ".metadata").read_bytes())
            h.update(json.dumps({k: state.get(k) for k in ("step", "config_hash")}, sort_keys=True).encode())
        else:
            for f in sorted(self.path.iterdir()):
                if f.suffix == ".json":
                    h.update(f.name.encode() + f.read_bytes())
                elif f.suffix in (".safetensors", ".bin"):
                    with open(f, "rb") as fh:
                        head = fh.read(8)
                        n = int.from_bytes(head, "little") if len(head) == 8 else 0
                        h.update(f.name.encode() + str(f.stat().st_size).encode() + head + fh.read(min(n, 1 << 24)))
        return {"source": str(self), "step": step, "sha256": h.hexdigest()[:16]}


def run_config(run: Path, step: int):
    """The config the run's checkpoint of ``step`` was trained with (it differs from the first run's ``config.yaml``
    after a resume that changed it), else ``RUN/config.yaml`` (a checkpoint written before configs were kept in it,
    or holding a key of an older version). Checked when the run started; not checked again here."""
    from difftrain.config import from_saved, read_tree

    saved = ckpt.read_train_state(ckpt.step_dir(Path(run) / "checkpoints", step)).get("config")
    if isinstance(saved, dict):
        try:
            return from_saved(saved)
        except ConfigError:  # a field of an older version: the run's own file still describes the model
            pass
    return from_saved(read_tree(Path(run) / "config.yaml"))


def parse_optional(key: str, text: str) -> Source | None:
    return Source.parse(key, text) if text else None


@torch.no_grad()
def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()
