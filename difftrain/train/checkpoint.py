"""Training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``RUN/checkpoints/step_00001000/``: DCP shards + ``.metadata`` (tensors only: model,
optimizer state, EMA, RNG), ``train_state.json`` (step, data-loader position, config hash) and
``COMPLETE``, written last by rank 0 after every rank has finished. A checkpoint without ``COMPLETE``
does not exist as far as resume is concerned — so a crash mid-save leaves the previous one in
charge, and no rename is needed (object stores have none). ``RUN/checkpoints/latest`` names the
newest complete one as a hint; resume scans for the newest complete directory itself.

Non-tensor state never goes through pickle: it lives in JSON. DCP's own ``.metadata`` file is a
pickle; we read it with a restricted unpickler that admits only DCP's metadata classes.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

MARKER = "COMPLETE"
STATE_FILE = "train_state.json"
RANKS_DIR = "ranks"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- safe DCP reader
_ALLOWED_PICKLE = {
    "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner", "collections", "torch", "torch._utils", "builtins",
}
_DENIED_BUILTINS = {"eval", "exec", "compile", "open", "getattr", "setattr", "__import__", "input", "delattr"}


_ALLOWED_NAMES = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                  ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_NAMES:
            return super().find_class(module, name)
        if module not in _ALLOWED_PICKLE or (module == "builtins" and name in _DENIED_BUILTINS):
            raise CheckpointError(f"checkpoint metadata refers to {module}.{name}: refusing to unpickle it")
        if module == "torch" and not (name in {"Size", "device"} or isinstance(getattr(torch, name, None), torch.dtype)):
            raise CheckpointError(f"checkpoint metadata refers to torch.{name}: refusing to unpickle it")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata load admits only DCP's own classes."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"'{path}' is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _FaultyWriter(FileSystemWriter):
    """Test hook (env DIFFTRAIN_FAULT=kill_in_save:STEP:RANK): this rank dies right after writing
    its shard, before the coordinator has written ``.metadata`` — a real mid-save death."""

    def __init__(self, path, kill: bool):
        super().__init__(path)
        self.kill = kill

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        if self.kill:
            fut.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return fut


def fault(kind: str, step: int) -> bool:
    """True when the DIFFTRAIN_FAULT test hook asks this rank to die at ``kind`` of ``step``."""
    spec = os.environ.get("DIFFTRAIN_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":  # once: not again after a restart
        return False
    k, s, r = spec.split(":")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return k == kind and int(s) == step and int(r) == rank


# ----------------------------------------------------------------------------------- layout
def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / MARKER).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1][1] if done else None


# ------------------------------------------------------------------------------ save / load
def save(ckpt_root: Path, step: int, tensors: dict, train_state: dict, keep_last: int,
         rank_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. ``rank_state`` (JSON-able,
    e.g. this rank's data-loader streams) goes to ``ranks/RANK.json``, read back by :func:`read_rank_states`."""
    d = step_dir(ckpt_root, step)
    rank = dist.get_rank()
    if rank == 0:
        if d.exists():  # a previous incomplete attempt at this step
            shutil.rmtree(d)
        d.mkdir(parents=True)
    dist.barrier()
    dcp.save(tensors, storage_writer=_FaultyWriter(d, fault("kill_in_save", step)))
    if rank_state is not None:
        (d / RANKS_DIR).mkdir(exist_ok=True)
        (d / RANKS_DIR / f"{rank:05d}.json").write_text(json.dumps(rank_state))
    dist.barrier()
    if rank == 0:
        (d / STATE_FILE).write_text(json.dumps(train_state, indent=1))
        (d / MARKER).write_text(str(step))  # last: from here on the checkpoint exists
        tmp = ckpt_root / "latest.tmp"
        tmp.write_text(d.name)
        tmp.replace(ckpt_root / "latest")
        _prune(ckpt_root, keep_last, newest=step)
    dist.barrier()
    return d


def _prune(ckpt_root: Path, keep_last: int, newest: int) -> None:
    done = [s for s, _ in complete_checkpoints(ckpt_root)]
    keep = set(done[-keep_last:]) if keep_last > 0 else set(done)
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and int(m.group(1)) not in keep and int(m.group(1)) <= newest:
            shutil.rmtree(d, ignore_errors=True)


def load(ckpt_dir: Path, tensors: dict) -> dict:
    """Load in place into ``tensors`` (any world size / sharding); returns the JSON train state."""
    if not (ckpt_dir / MARKER).is_file():
        raise CheckpointError(f"checkpoint '{ckpt_dir}' is incomplete (no {MARKER} marker)")
    reader = SafeReader(ckpt_dir)
    reader.read_metadata()  # fails here, with one clear message, on foreign pickle content
    dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
    return json.loads((ckpt_dir / STATE_FILE).read_text())


def read_train_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / STATE_FILE).read_text())


def read_rank_states(ckpt_dir: Path) -> list[dict]:
    """Every saving rank's ``rank_state``, in rank order (plain JSON: nothing is unpickled)."""
    return [json.loads(f.read_text()) for f in sorted((ckpt_dir / RANKS_DIR).glob("*.json"))]
