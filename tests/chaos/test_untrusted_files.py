"""Untrusted files (issue 14, must-haves 1, 6 and 7): nothing read from a run or an ``init_from`` folder runs code,
and a corrupt file in the newest checkpoint is named in one line while the previous complete checkpoint is used.

Every crafted payload is first shown to be live (plain ``pickle`` or stock DCP runs it: a marker file appears), then
read through the entry points that read a run: ``difftrain export``, ``difftrain sample``, ``load_run_weights`` and a
resume (``Trainer.maybe_resume``, also under the DeepSpeed ZeRO-3 engine). The marker must not appear and the error is one line naming the file.
In-process, on a real run trained here (one process, gloo) and real files; one slow test under torchrun checks that
two FSDP2 ranks fall back together when only one rank's shard is corrupt, and finish like an uninterrupted run.
"""
from __future__ import annotations

import os
import pickle
import shutil
import struct
from unittest import mock
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from difftrain import cli
from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.launch.env import shutdown
from difftrain.models import registry
from difftrain.train import checkpoint as ckpt
from difftrain.train.build import check_init_from, load_weights_only, read_model_config
from difftrain.train.sources import load_run_weights
from difftrain.train.trainer import Trainer
from tests.chaos.jobs import ZERO3
from tests.conftest import REPO
from tests.distributed.test_resume import COMMON, assert_same, assert_same_weights, train, weights
from tests.unit.test_init_from import WEIGHTS, model as tiny_model

STEPS = ("step_00000002", "step_00000004")  # the run's two complete checkpoints


# ------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def run(digits, tmp_path_factory) -> Path:
    """A real run: 4 steps, checkpoints at 2 and 4 (the small model of tests/distributed/test_resume.py)."""
    d = tmp_path_factory.mktemp("untrusted") / "run"
    trainer = Trainer(_config(d, digits["train"]))
    try:
        trainer.fit()
    finally:
        _close(trainer)
    assert sorted(p.name for _, p in ckpt.complete_checkpoints(d / "checkpoints")) == list(STEPS)
    return d


def _config(run_dir: Path, train: str, *extra: str):
    return load_config(REPO / COMMON[0], [*COMMON[1:], "run.steps=4", "run.ckpt_every=2", "data.num_workers=0",
                                   f"data.train={train}", f"run.dir={run_dir}", *extra])


def _close(trainer) -> None:
    signals = getattr(trainer, "signals", None)
    if signals is not None:
        signals.restore()
    shutdown()


@pytest.fixture()
def copy(run, tmp_path) -> Path:
    """A copy of the run to damage (its config.yaml still names the original dir; entry points take the copy's)."""
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------- payloads
def _str(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


PROTO4 = pickle.PROTO + b"\x04"


def dotted_names(marker: Path) -> bytes:
    """The issue's exploit, from modules the old reader allowed whole: protocol 4 resolves dotted names, so
    ``object.__getattribute__(collections._sys.modules.get('os'), 'system')('touch MARKER')``."""
    return (PROTO4 + _global("builtins", "object.__getattribute__")
            + _global("collections", "_sys.modules.get") + _str("os") + pickle.TUPLE1 + pickle.REDUCE
            + _str("system") + pickle.TUPLE2 + pickle.REDUCE
            + _str(f"touch '{marker}'") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


class _System:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def reduce_to_system(marker: Path) -> bytes:
    return pickle.dumps(_System(f"touch '{marker}'"))


def _builtin(fn: str):
    def payload(marker: Path) -> bytes:
        return (PROTO4 + _global("builtins", fn) + _str(f"__import__('os').system(\"touch '{marker}'\")")
                + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    payload.__name__ = f"builtins_{fn}"
    return payload


def builtins_getattr(marker: Path) -> bytes:
    """``getattr(__import__('os'), 'system')('touch MARKER')``"""
    return (PROTO4 + _global("builtins", "getattr") + _global("builtins", "__import__") + _str("os") + pickle.TUPLE1
            + pickle.REDUCE + _str("system") + pickle.TUPLE2 + pickle.REDUCE
            + _str(f"touch '{marker}'") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def unlisted_global(marker: Path) -> bytes:
    """A plain name from ``torch``, whose dtypes and ``Size`` DCP metadata does hold: ``torch.save('x', MARKER)``."""
    return (PROTO4 + _global("torch", "save") + _str("x") + _str(str(marker)) + pickle.TUPLE2 + pickle.REDUCE
            + pickle.STOP)


PICKLES = [dotted_names, reduce_to_system, _builtin("eval"), _builtin("exec"), builtins_getattr, unlisted_global]


def bytes_entry(ckpt_dir: Path, marker: Path) -> None:
    """Rewrite a checkpoint as DCP saves it when an entry is not a tensor: the metadata declares the first model
    entry ``BytesStorageMetadata`` and its data is a pickle that runs ``touch MARKER`` when torch.load'ed."""
    md = ckpt.read_metadata(ckpt_dir / ".metadata")
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    ckpt.load_tensors(ckpt_dir, state)
    key = next(k for k in state if k.startswith("model."))
    state[key] = _System(f"touch '{marker}'")
    for f in [*ckpt_dir.glob("*.distcp"), ckpt_dir / ".metadata"]:
        f.unlink()
    dcp.save(state, storage_writer=FileSystemWriter(ckpt_dir), no_dist=True)


def poison(run_dir: Path, payload, marker: Path, steps=STEPS) -> None:
    for step in steps:
        d = run_dir / "checkpoints" / step
        if payload is bytes_entry:
            bytes_entry(d, marker)
        else:
            (d / ".metadata").write_bytes(payload(marker))


def _model_keys(run_dir: Path) -> dict:
    arch, acfg = read_model_config(run_dir)
    return {f"model.backbone.{k}": v for k, v in registry.build(arch, acfg).state_dict().items()}


@pytest.mark.parametrize("payload", PICKLES, ids=lambda p: p.__name__)
def test_each_pickle_payload_is_live(payload, tmp_path):
    """The payloads are real exploits: an unrestricted unpickler runs them."""
    marker = tmp_path / "ran"
    try:
        pickle.loads(payload(marker))
    except Exception:
        pass  # what the code returns may fail later; it has run by then
    assert marker.exists()


def test_bytes_entry_is_live_under_stock_dcp(copy, tmp_path):
    """Stock DCP (FileSystemReader + DefaultLoadPlanner) unpickles a bytes entry with weights_only=False."""
    marker = tmp_path / "ran"
    poison(copy, bytes_entry, marker, steps=STEPS[-1:])
    tensors = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in _model_keys(copy).items()}
    try:
        dcp.load(tensors, storage_reader=FileSystemReader(copy / "checkpoints" / STEPS[-1]), no_dist=True)
    except BaseException:  # CheckpointException is a BaseException
        pass
    assert marker.exists()


# ------------------------------------------------------------------------------------- entry points
def via_export(run_dir: Path, tmp_path: Path, capsys) -> str:
    return _cli(["export", str(run_dir), "--out", str(tmp_path / "export")], capsys)


def via_sample(run_dir: Path, tmp_path: Path, capsys) -> str:
    return _cli(["sample", str(run_dir), "--num", "2", "--steps", "2", "--out", str(tmp_path / "samples")], capsys)


def _cli(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    # one line for the error, after one warning line per checkpoint that was skipped: no traceback
    assert exit_.value.code == 1 and lines[-1].startswith("difftrain: error: "), lines
    assert all(line.startswith("difftrain: warning: ") for line in lines[:-1]), lines
    return lines[-1]


def via_load_run_weights(run_dir: Path, tmp_path: Path, capsys) -> str:
    arch, acfg = read_model_config(run_dir)
    m = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    with pytest.raises(ckpt.CheckpointError) as err:
        load_run_weights(run_dir, m)
    return _one_line(err.value)


def via_resume(run_dir: Path, tmp_path: Path, capsys, *engine: str) -> str:
    trainer = Trainer(_config(run_dir, _train_spec(run_dir), *engine))
    try:
        with pytest.raises(ckpt.CheckpointError) as err:
            trainer.maybe_resume()
    finally:
        _close(trainer)
    return _one_line(err.value)


def via_resume_deepspeed(run_dir: Path, tmp_path: Path, capsys) -> str:
    """The resume under the DeepSpeed engine (ZeRO-3), which reads through the same restricted reader."""
    with mock.patch.dict(os.environ):  # the engine exports LOCAL_RANK for DeepSpeed (no launcher here)
        return via_resume(run_dir, tmp_path, capsys, *ZERO3)


def _train_spec(run_dir: Path) -> str:
    return load_config(run_dir / "config.yaml").data.train


def _one_line(e: BaseException) -> str:
    assert "\n" not in str(e), str(e)
    return str(e)


ENTRY_POINTS = [via_export, via_sample, via_load_run_weights, via_resume, via_resume_deepspeed]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("payload", [*PICKLES, bytes_entry], ids=lambda p: p.__name__)
def test_crafted_checkpoint_runs_no_code(payload, entry, copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    poison(copy, payload, marker)
    msg = entry(copy, tmp_path, capsys)
    assert not marker.exists()
    assert f"'{copy / 'checkpoints' / STEPS[-1] / '.metadata'}'" in msg and "no complete checkpoint" in msg
    assert ("pickled bytes" if payload is bytes_entry else "refusing to unpickle") in msg


def test_tensors_only_planner_refuses_bytes_even_past_the_metadata_check(copy, tmp_path):
    """Second layer: with stock DCP's reader (no metadata check), the planner still refuses the bytes item."""
    marker = tmp_path / "ran"
    poison(copy, bytes_entry, marker, steps=STEPS[-1:])
    tensors = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in _model_keys(copy).items()}
    with pytest.raises(BaseException, match="is not a tensor: refusing to unpickle it"):
        dcp.load(tensors, storage_reader=FileSystemReader(copy / "checkpoints" / STEPS[-1]),
                 planner=ckpt._TensorsOnlyPlanner(), no_dist=True)
    assert not marker.exists()


def test_poisoned_newest_falls_back_with_a_warning(copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    poison(copy, dotted_names, marker, steps=STEPS[-1:])
    arch, acfg = read_model_config(copy)
    m = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    capsys.readouterr()
    assert load_run_weights(copy, m) == 2
    assert not marker.exists()
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert "'builtins.object.__getattribute__'" in warning and STEPS[-1] in warning


# ------------------------------------------------------------------------------ our own checkpoints
def test_real_checkpoints_load_and_hold_tensors_only(run, tmp_path, capsys):
    for _, d in ckpt.complete_checkpoints(run / "checkpoints"):
        md = ckpt.read_metadata(d / ".metadata")
        assert all(isinstance(m, ckpt.TensorStorageMetadata) for m in md.state_dict_metadata.values())
        assert {k.split(".")[0] for k in md.state_dict_metadata} == {"model", "optim", "ema", "rng"}
    cli.main(["export", str(run), "--out", str(tmp_path / "export")])
    assert "exported EMA weights of step 4" in capsys.readouterr().out


def test_save_refuses_a_non_tensor_entry(tmp_path):
    with pytest.raises(TypeError, match="checkpoint entry 'rng.cpu' is not a tensor"):
        ckpt._check_tensors_only({"model": {"w": torch.zeros(1)}, "rng": {"cpu": 3}})


# ------------------------------------------------------------------ a corrupt newest checkpoint (must-have 6)
def _truncate(f: Path) -> None:
    """Keep the first eighth: in a shard, that is part of the model's tensors (model, optimizer, EMA, RNG follow)."""
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 8])


def _garble(f: Path) -> None:
    f.write_bytes(os.urandom(f.stat().st_size))


CORRUPTIONS = {
    "shard truncated": ("__0_0.distcp", _truncate),  # some tensors load first: the fallback overwrites them
    "shard garbled": ("__0_0.distcp", _garble),
    "metadata truncated": (".metadata", _truncate),
    "metadata garbled": (".metadata", _garble),
    "train_state broken": (ckpt.STATE_FILE, lambda f: f.write_text('{"step": 4,')),
    "rank state broken": ("ranks/00000.json", lambda f: f.write_text("[1, 2")),
    "rank state missing": ("ranks/00000.json", Path.unlink),
}


def _corrupt(run_dir: Path, step: str, what: str) -> Path:
    name, damage = CORRUPTIONS[what]
    f = run_dir / "checkpoints" / step / name
    damage(f)
    return f


@pytest.fixture()
def reference(run, tmp_path) -> Path:
    """The run without its newest checkpoint: what a fallback must load, bit for bit."""
    d = Path(shutil.copytree(run, tmp_path / "reference"))
    shutil.rmtree(d / "checkpoints" / STEPS[-1])
    return d


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupt_newest_is_named_and_the_previous_loads(what, copy, reference, capsys):
    f = _corrupt(copy, STEPS[-1], what)
    for which in ("model", "ema"):
        capsys.readouterr()
        step, w = weights(copy, which)
        (warning,) = capsys.readouterr().err.strip().splitlines()
        assert warning.startswith("difftrain: warning: ") and f"'{f}'" in warning, warning
        assert warning.endswith(f"falling back to the previous complete checkpoint {STEPS[0]}"), warning
        assert step == 2
        assert_same(w, weights(reference, which)[1])


def _resumed(run_dir: Path) -> tuple[Trainer, dict, dict]:
    trainer = Trainer(_config(run_dir, _train_spec(run_dir)))
    try:
        assert trainer.maybe_resume()
        tensors = {k: v.clone() for k, v in _flat(trainer._tensors()).items()}
        return trainer, tensors, trainer.loader.state_dict()
    finally:
        _close(trainer)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("what", ["shard truncated", "metadata garbled", "rank state broken"])
def test_resume_falls_back_to_the_previous_checkpoint_whole(what, copy, reference, capsys):
    """Weights, optimizer state, EMA, RNG and the data-loader position all come from the previous checkpoint."""
    f = _corrupt(copy, STEPS[-1], what)
    capsys.readouterr()
    trainer, tensors, loader = _resumed(copy)
    err = capsys.readouterr().err
    assert trainer.step == 2 and f"'{f}'" in err and "falling back" in err
    ref_trainer, ref_tensors, ref_loader = _resumed(reference)
    assert ref_trainer.step == 2
    assert_same(tensors, ref_tensors)
    assert loader == ref_loader


@pytest.mark.slow
def test_two_ranks_fall_back_together_and_finish_like_a_straight_run(digits, tmp_path):
    """Rank 1's shard of the newest checkpoint is truncated: only rank 1's read fails, both ranks take step 10, and
    the run ends with the weights of an uninterrupted run, bit for bit."""
    straight, d = tmp_path / "straight", tmp_path / "corrupt"
    train(2, straight, digits, "parallel.engine=fsdp2")
    train(2, d, digits, "parallel.engine=fsdp2", "run.steps=15", "run.ckpt_every=5")
    f = d / "checkpoints" / "step_00000015" / "__1_0.distcp"
    _truncate(f)
    p = train(2, d, digits, "parallel.engine=fsdp2", "run.ckpt_every=5")
    warnings = [line for line in p.stderr.splitlines() if line.startswith("difftrain: warning: ")]
    assert len(warnings) == 1 and f"'{f}' is unreadable" in warnings[0], p.stderr[-3000:]
    assert warnings[0].endswith("falling back to the previous complete checkpoint step_00000010")
    assert f"resumed from {d / 'checkpoints' / 'step_00000010'} (step 10" in p.stdout
    assert_same_weights(straight, d, 20)


def test_no_complete_checkpoint_left_is_one_line(copy, tmp_path, capsys):
    shutil.rmtree(copy / "checkpoints" / STEPS[0])
    f = _corrupt(copy, STEPS[-1], "shard truncated")
    for entry in (via_load_run_weights, via_export):
        msg = entry(copy, tmp_path, capsys)
        assert f"'{f}' is unreadable" in msg and "no complete checkpoint" in msg, msg


# -------------------------------------------------------------------------------- init_from (must-have 7)
@pytest.fixture()
def init_folders(tmp_path) -> tuple:
    src = tiny_model("dit-class", 1)
    registry.save_pretrained(src, src.state_dict(), tmp_path / "ours")
    src.save_diffusers(src.state_dict(), tmp_path / "diffusers")
    return src, tmp_path / "ours", tmp_path / "diffusers"


@pytest.mark.parametrize("folder,name", [("ours", "model.safetensors"), ("diffusers", WEIGHTS),
                                         ("ours", "config.json")])
@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbage"])
def test_bad_init_from_file_is_one_config_error_naming_it(init_folders, folder, name, damage):
    src, ours, diffusers = init_folders
    path = {"ours": ours, "diffusers": diffusers}[folder]
    check_init_from(str(path))  # sound before the damage
    damage(path / name)
    for check in (lambda: check_init_from(str(path)), lambda: load_weights_only(tiny_model("dit-class", 2), str(path))):
        with pytest.raises(ConfigError) as err:
            check()
        assert f"'{path / name}'" in str(err.value) and "init_from" in str(err.value)
        assert "\n" not in str(err.value)


def test_bad_shard_of_an_index_is_named(init_folders):
    from safetensors.torch import load_file, save_file

    _, _, folder = init_folders
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    keys = sorted(state)
    for name, ks in (("part-1.safetensors", keys[::2]), ("part-2.safetensors", keys[1::2])):
        save_file({k: state[k] for k in ks}, str(folder / name))
    index = {"weight_map": {k: f"part-{1 + i % 2}.safetensors" for i, k in enumerate(keys)}}
    (folder / f"{WEIGHTS}.index.json").write_text(__import__("json").dumps(index))
    check_init_from(str(folder))
    _truncate(folder / "part-2.safetensors")
    with pytest.raises(ConfigError, match="part-2.safetensors' is not a readable safetensors file"):
        check_init_from(str(folder))
    (folder / "part-2.safetensors").unlink()
    with pytest.raises(ConfigError, match="names shard 'part-2.safetensors', which is not in the folder"):
        check_init_from(str(folder))
