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


def base_record(source: Source) -> dict:
    """How a checkpoint records the frozen base of a changed module (``Trainer.base_sources``): the source's
    fingerprint, and where to read it again (:func:`base_source`)."""
    return {**source.fingerprint(), "key": source.key, "path": str(source.path.resolve()), "weights": source.weights}


def base_source(record: dict, run: Path, name: str) -> Source:
    """The base a checkpoint's :func:`base_record` names, checked to be the same weights: ``ConfigError`` naming the
    run, the module and both fingerprints when it is gone or has changed (the adapters fit no other base)."""
    src = Source(record.get("key", "init_from"), Path(record["path"]), record.get("weights"))
    try:
        now = src.fingerprint()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"'{run}': the frozen base of '{name}', {record['source']} (fingerprint {record['sha256']}), "
                          f"which its checkpoints leave out, cannot be read ({type(e).__name__}: {e})") from None
    if now["sha256"] != record["sha256"]:
        raise ConfigError(f"'{run}': the frozen base of '{name}' was {record['source']} (step {record['step']}, "
                          f"fingerprint {record['sha256']}), now step {now['step']}, fingerprint {now['sha256']}: its "
                          "checkpoints hold only what the model changes train, which fit no other base (restore it)")
    return src


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


def _saved_keys(ckpt_root: Path, step, served: str | None) -> set[str]:
    """The served module's state-dict keys in the checkpoint of ``step`` (its DCP metadata, read safely)."""
    from difftrain.train.checkpoint import read_metadata, step_dir

    prefix = f"model.{served}." if served else "model."
    md = read_metadata(step_dir(ckpt_root, int(step)) / ".metadata")
    return {k[len(prefix):] for k in md.state_dict_metadata if k.startswith(prefix)}


def load_run_weights(run_dir: Path, model: nn.Module, which: str = "ema", merge: bool = True) -> int:
    """Load a run's newest complete checkpoint's served module (``train_state["served"]``) into ``model``, plain or
    sharded (DCP reads into its tensors, any world size wrote it). ``which="ema"`` overlays the EMA parameters on
    the saved module state. Returns the step. A corrupt newest checkpoint is named in a warning and the previous
    complete one is used (``checkpoint.resume_newest``); ``CheckpointError`` when none loads. A run trained with
    model changes (``adapt``) is read into ``model`` with the changes applied, then merged into the plain
    architecture; ``merge=False`` leaves them applied (unmerged adapters, e.g. to export them)."""
    from difftrain.train.checkpoint import CheckpointError, resume_newest

    from torch.distributed.tensor import DTensor

    from difftrain.config import from_saved
    from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes
    from difftrain.train import build

    tensors: dict = {}
    own = {k: v.detach() for k, v in model.state_dict().items()}
    ema = {n: torch.empty_like(p) for n, p in model.named_parameters()} if which == "ema" else None
    changes: list = []
    grads: dict = {}  # requires_grad of the plain module's parameters, restored after the merge

    def layout(state: dict) -> None:  # the checkpoint's own layout, known once its train state is read
        nonlocal own, ema, changes
        served = state.get("served")
        tensors.clear()
        adapt = (state.get("config") or {}).get("adapt") or []
        if adapt and not changes:  # a run with model changes: its module as trained, merged after the load
            if any(isinstance(p, DTensor) for p in model.parameters()):
                raise ValueError(f"'{run_dir}' was trained with model changes (adapt); it is read into a whole "
                                 "module, then merged, not into a sharded one")
            changes = changes_of(from_saved(state["config"]))
            base = (state.get("base") or {}).get(served)
            if base is not None:  # the checkpoint holds what the changes train; the base is read from its source
                base_source(base, Path(run_dir), served).load(model)
            grads.update({n: p.requires_grad for n, p in model.named_parameters()})
            apply_changes(model, changes, 0)  # every new tensor is read from the checkpoint
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if base is not None else set()
            own = {k: v.detach() for k, v in model.state_dict().items() if k not in frozen}
            if which == "ema":  # the EMA covers what was trained: the adapters
                ema = {n: torch.empty_like(p) for n, p in model.named_parameters() if p.requires_grad}
        saved = _saved_keys(Path(run_dir) / "checkpoints", state.get("step"), served)
        for d in (own, ema or {}):  # weights of the model without an optional flag: those keys keep their init
            for k in [k for k in d if build._optional(model, k) and k not in saved]:
                del d[k]
        if served is None:  # written before stages owned their modules: one flat module
            tensors.update({"model": own, **({"ema": ema} if ema is not None else {})})
        else:
            tensors.update({"model": {served: own}, **({"ema": {served: ema}} if ema is not None else {})})

    found = resume_newest(Path(run_dir) / "checkpoints", tensors, before_load=layout)
    if found is None:
        raise CheckpointError(f"'{run_dir}' has no complete checkpoint")
    if ema is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ema:  # not an optional key the checkpoint lacks
                    p.copy_(ema[n])
    if changes and merge:
        merge_changes(model, changes)
        for n, p in model.named_parameters():
            if n in grads:  # not a module a change keeps (a ControlNet branch)
                p.requires_grad_(grads[n])
    return found[1]["step"]
