"""Training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``RUN/checkpoints/step_00001000/``: DCP shards + ``.metadata`` (tensors only: model,
optimizer state, EMA, RNG), ``train_state.json`` (step, data-loader position, config hash),
``ranks/RANK.json`` (each rank's data-loader state) and ``COMPLETE``, written last by rank 0 after every
rank has finished. A checkpoint without ``COMPLETE`` does not exist as far as resume is concerned — so a
crash mid-save leaves the previous one in charge, and no rename is needed (object stores have none).
``RUN/checkpoints/latest`` names the newest complete one as a hint; resume scans for the newest complete
directory itself.

A checkpoint is untrusted input (teams hand them to each other), and nothing read from one runs code:

- ``train_state.json`` and ``ranks/RANK.json`` are JSON; non-tensor state never goes through pickle.
- DCP's ``.metadata`` is a pickle. It is read by an unpickler that can build only the exact (module, name)
  pairs a DCP metadata file written by torch 2.14 holds (``_METADATA_GLOBALS``: DCP's metadata dataclasses,
  ``torch.Size``, dtypes, the layout lookup, ``PosixPath``), nothing else: no module-wide allowance, no dotted
  names (protocol 4 resolves ``object.__getattribute__`` through ``builtins``), no other callable. The result
  must then declare tensor entries only: DCP reads an entry declared ``BytesStorageMetadata`` with
  ``torch.load(weights_only=False)``, so such metadata is refused before any data is read (and the planner
  and the reader refuse a non-tensor item besides); its data files must be plain names in the folder.
- The ``.distcp`` data files: DCP reads each tensor with ``torch.load(weights_only=True)``, torch's own
  restricted unpickler for tensors and storages (the one pickle read left, inside DCP's reader).

A checkpoint file that does not read back (truncated, garbled, broken JSON, a missing rank file) raises
:class:`CheckpointError` naming the file; :func:`resume_newest` then warns in one line and falls back to
the previous complete checkpoint, every rank to the same one.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint import metadata as _dcp_md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.futures import Future

from difftrain.errors import DifftrainError, say
from difftrain.train.supervise import alone

MARKER = "COMPLETE"
STATE_FILE = "train_state.json"
RANKS_DIR = "ranks"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(DifftrainError):
    """A checkpoint that is incomplete, unreadable or refused (foreign pickle content); names the file."""


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


# ----------------------------------------------------------------------------- safe DCP reader
# Every global a DCP ``.metadata`` pickle of torch 2.14.1 holds, found by pickling the metadata of real saves of our
# engines' state (model, AdamW state, EMA, RNG; DDP, FSDP2 and pipeline segments; DiT and UNet) and listing the
# globals (pickletools), plus ``BytesStorageMetadata`` (refused after loading, with a clearer message) and every
# dtype (data, not callables). Mapped to the objects themselves: ``find_class`` imports and resolves nothing.
_METADATA_GLOBALS: dict[tuple[str, str], object] = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(_dcp_md, n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _dcp_fs._StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # "torch.strided" -> torch.strided
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id
    **{("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        found = _METADATA_GLOBALS.get((module, name))
        if found is None:
            raise CheckpointError(f"checkpoint file '{self.path}' refers to {f'{module}.{name}'[:200]!r}, which DCP "
                                  "metadata never holds: refusing to unpickle it")
        return found

    def persistent_load(self, pid):
        raise CheckpointError(f"checkpoint file '{self.path}' holds a persistent id: refusing to unpickle it")


def read_metadata(path: Path) -> Metadata:
    """DCP metadata from ``path`` through the allow-list, checked to declare tensors only, in plain files."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint file '{path}' is unreadable ({_one_line(e)})") from None
    try:
        metadata = _MetadataUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbled: UnpicklingError, EOFError, TypeError from a constructor, ...
        raise CheckpointError(f"checkpoint file '{path}' is not readable DCP metadata ({_one_line(e)})") from None
    _check_metadata(metadata, path)
    return metadata


def _check_metadata(md, path: Path) -> None:
    if not isinstance(md, Metadata):
        raise CheckpointError(f"checkpoint file '{path}' is not DCP metadata (it holds a {type(md).__name__})")
    if (not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict)
            or not isinstance(getattr(md, "storage_meta", None), (StorageMeta, type(None)))):
        raise CheckpointError(f"checkpoint file '{path}' is not DCP metadata (its tables have the wrong types)")
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            raise CheckpointError(f"checkpoint file '{path}' declares entry {str(key)[:200]!r} as pickled bytes, "
                                  "which would run code when read: refusing it (difftrain saves tensors only)")
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint file '{path}' declares entry {str(key)[:200]!r} as a "
                                  f"{type(entry).__name__}, not a tensor")
    for index, info in md.storage_data.items():
        name = getattr(info, "relative_path", None)
        if (not isinstance(info, _dcp_fs._StorageInfo) or not isinstance(name, str) or name in ("", ".", "..")
                or Path(name).name != name or "\\" in name or info.transform_descriptors):
            raise CheckpointError(f"checkpoint file '{path}' stores entry {str(getattr(index, 'fqn', index))[:200]!r} "
                                  f"in {str(name)[:200]!r}: expected a plain data file of the checkpoint")


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that a bytes item (which DCP would ``torch.load(weights_only=False)``) is an error."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry '{read_item.dest_index.fqn}' is not a tensor: refusing to unpickle it")


class SafeReader(FileSystemReader):
    """FileSystemReader that reads metadata through :func:`read_metadata` (once per file), reads tensor items only,
    and names the data file a failed read came from."""

    def __init__(self, path):
        super().__init__(path)
        self._metadata: dict = {}

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = read_metadata(Path(self._get_metadata_path(rank)))
        metadata = self._metadata[rank]
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                raise CheckpointError(f"checkpoint '{self.path}': entry '{item.dest_index.fqn}' is not a tensor: "
                                      "refusing to read it")
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                super().read_data(LoadPlan(items), planner).wait()
            except Exception as e:
                raise CheckpointError(f"checkpoint file '{Path(self.path) / name}' is unreadable "
                                      f"({_one_line(e)})") from None
        fut: Future = Future()
        fut.set_result(None)
        return fut


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
    _check_tensors_only(tensors)
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
        with alone():  # the others wait in the barrier: not a stall however long pruning takes
            (d / STATE_FILE).write_text(json.dumps(train_state, indent=1))
            (d / MARKER).write_text(str(step))  # last: from here on the checkpoint exists
            tmp = ckpt_root / "latest.tmp"
            tmp.write_text(d.name)
            tmp.replace(ckpt_root / "latest")
            _prune(ckpt_root, keep_last, newest=step)
    dist.barrier()
    return d


def checkpoint_bytes(tree) -> int:
    """Bytes of the tensors in ``tree`` as a checkpoint stores them: a sharded tensor (DTensor) by its whole
    shape, once; a replicated one once."""
    if isinstance(tree, dict):
        return sum(checkpoint_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return math.prod(tree.shape) * tree.element_size()
    return 0


def _check_tensors_only(tree, prefix: str = "") -> None:
    """Only tensors go into DCP: anything else would be saved as pickled bytes, which a load refuses."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _check_tensors_only(v, f"{prefix}{k}.")
        elif not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry '{prefix}{k}' is not a tensor ({type(v).__name__}): only tensors go "
                            "into a checkpoint (JSON state goes into train_state.json or ranks/RANK.json)")


def _prune(ckpt_root: Path, keep_last: int, newest: int) -> None:
    done = [s for s, _ in complete_checkpoints(ckpt_root)]
    keep = set(done[-keep_last:]) if keep_last > 0 else set(done)
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and int(m.group(1)) not in keep and int(m.group(1)) <= newest:
            shutil.rmtree(d, ignore_errors=True)


def load(ckpt_dir: Path, tensors: dict) -> dict:
    """Load in place into ``tensors`` (any world size / sharding); returns the JSON train state.
    ``CheckpointError`` naming the file that is incomplete, unreadable or refused."""
    if not (ckpt_dir / MARKER).is_file():
        raise CheckpointError(f"checkpoint '{ckpt_dir}' is incomplete (no {MARKER} marker)")
    state = read_train_state(ckpt_dir)
    load_tensors(ckpt_dir, tensors)
    return state


def load_tensors(ckpt_dir: Path, tensors: dict) -> None:
    """DCP load in place into every tensor of ``tensors`` (collective when a process group is up); the metadata is
    read and checked first, so nothing is read from a checkpoint it refuses."""
    reader = SafeReader(ckpt_dir)
    reader.read_metadata()  # fails here, in one line, on foreign pickle content or a non-tensor entry
    try:
        with warnings.catch_warnings():  # a single process (sample, export) is meant: no two-line warning about it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(tensors, storage_reader=reader, planner=_TensorsOnlyPlanner(), no_dist=not _collective())
    except CheckpointException as e:  # DCP gathers every rank's failure (tracebacks and all): keep one line
        failures = {rank: exc for rank, (exc, _) in sorted(e.failures.items())}
        if not all(isinstance(exc, Exception) for exc in failures.values()):
            raise  # KeyboardInterrupt and the like are not a bad checkpoint
        ours = [exc for exc in failures.values() if isinstance(exc, CheckpointError)]
        if ours:
            raise ours[0] from None
        rank, exc = next(iter(failures.items()))
        raise CheckpointError(f"checkpoint '{ckpt_dir}' does not load into this run (rank {rank}: "
                              f"{_one_line(exc)})") from None


def resume_newest(ckpt_root: Path, tensors: dict,
                  before_load: Callable[[dict], None] | None = None) -> tuple[Path, dict] | None:
    """Load the newest complete checkpoint that reads back into ``tensors`` (in place); (its dir, its train state),
    or None when there is no complete checkpoint. Collective when a process group is up: every rank calls it.

    Complete checkpoints are tried newest first. One whose ``train_state.json``, ``ranks/*.json``, ``.metadata``
    or data files do not read back is named in a one-line warning and the previous one is tried; every rank takes
    the same one (a failure on any rank counts for all), and the DCP load of the one taken overwrites every tensor
    (a failed load may have written some). ``before_load(train_state)`` runs for each checkpoint tried, before any
    tensor is read; its exceptions propagate unchanged. ``CheckpointError`` when no complete checkpoint loads."""
    done = complete_checkpoints(Path(ckpt_root))
    if not done:
        return None
    errors: list[CheckpointError] = []
    for i, (_, d) in enumerate(reversed(done)):
        older = done[-i - 2][1].name if i + 1 < len(done) else None
        try:
            state = _agreed(lambda: _check_files(d))
        except CheckpointError as e:
            errors.append(e)
            _fell_back(e, older)
            continue
        if before_load is not None:
            before_load(state)
        try:
            load_tensors(d, tensors)
        except CheckpointError as e:
            errors.append(e)
            _fell_back(e, older)
            continue
        return d, state
    more = f" (and {len(errors) - 1} older complete checkpoint(s) fail too)" if len(errors) > 1 else ""
    raise CheckpointError(f"no complete checkpoint in '{ckpt_root}' loads: {errors[0]}{more}")


def _check_files(d: Path) -> dict:
    """The JSON state of checkpoint ``d`` after reading every small file it has (state, rank states, metadata)."""
    state = read_train_state(d)
    read_rank_states(d, state.get("world_size"))
    read_metadata(d / ".metadata")
    return state


_READING_ALONE = [False]


@contextlib.contextmanager
def reading_alone():
    """Loads inside are this process's own, not collectives, although a process group is up (a rank that builds
    initial weights for the others, e.g. the pipeline's ``broadcast_init`` on rank 0)."""
    _READING_ALONE[0] = True
    try:
        yield
    finally:
        _READING_ALONE[0] = False


def _collective() -> bool:
    return dist.is_initialized() and not _READING_ALONE[0]


def _agreed(check: Callable[[], dict]) -> dict:
    """``check()`` on every rank; if it raised ``CheckpointError`` on any rank, it raises on every rank."""
    err, out = None, None
    try:
        out = check()
    except Exception as e:  # any failure, so that no rank is left waiting in the gather below
        err = e
    if _collective() and dist.get_world_size() > 1:
        msgs: list = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, None if err is None else str(err))  # strings between our own ranks
        if err is None:
            err = next((CheckpointError(m) for m in msgs if m is not None), None)
    if err is not None:
        raise err
    return out


def _fell_back(e: CheckpointError, older: str | None) -> None:
    if older is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        say(f"difftrain: warning: {e}; falling back to the previous complete checkpoint {older}")


def read_train_state(ckpt_dir: Path) -> dict:
    """``train_state.json``; ``CheckpointError`` naming it when it is unreadable or has no integer step."""
    f = Path(ckpt_dir) / STATE_FILE
    state = _read_json(f)
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint file '{f}' has no integer 'step'")
    return state


def read_rank_states(ckpt_dir: Path, world_size: int | None = None) -> list[dict]:
    """Every saving rank's ``rank_state``, in rank order (plain JSON: nothing is unpickled). With ``world_size``
    (the trainer's train state has it, and its checkpoints have rank states), one per rank must be there."""
    d = Path(ckpt_dir) / RANKS_DIR
    files = sorted(d.glob("*.json"))
    if isinstance(world_size, int):
        for r in range(world_size):
            if not (d / f"{r:05d}.json").is_file():
                raise CheckpointError(f"checkpoint file '{d / f'{r:05d}.json'}' is missing "
                                      f"(saved by {world_size} ranks)")
        files = [d / f"{r:05d}.json" for r in range(world_size)]
    return [_read_json(f) for f in files]


def _read_json(f: Path) -> dict:
    try:
        value = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, not JSON
        raise CheckpointError(f"checkpoint file '{f}' is unreadable ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint file '{f}' is not a JSON object")
    return value
