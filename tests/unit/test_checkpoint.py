import os
import pickle

import pytest
import torch

from difftrain.train import checkpoint as ckpt


def test_save_load_roundtrip_marker_latest_and_keep_last(tmp_path, world1):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        t = {"model": {"w": torch.full((3, 2), float(step))}, "rng": {"cpu": torch.get_rng_state()}}
        d = ckpt.save(root, step, t, {"step": step, "data": {"g": step}}, keep_last=2)
        assert (d / ckpt.MARKER).is_file()
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2, 3]
    assert (root / "latest").read_text() == "step_00000003"
    dest = {"model": {"w": torch.zeros(3, 2)}}
    state = ckpt.load(ckpt.latest_checkpoint(root), dest)
    assert state == {"step": 3, "data": {"g": 3}}
    assert torch.equal(dest["model"]["w"], torch.full((3, 2), 3.0))


def test_incomplete_checkpoint_is_ignored_and_refused(tmp_path, world1):
    root = tmp_path / "ckpt"
    ckpt.save(root, 1, {"w": torch.ones(2)}, {"step": 1}, keep_last=3)
    partial = ckpt.step_dir(root, 2)
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half written")
    assert ckpt.latest_checkpoint(root).name == "step_00000001"
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load(partial, {"w": torch.zeros(2)})


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_metadata_pickle_with_foreign_globals_is_refused(tmp_path, world1, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ckpt"
    d = ckpt.save(root, 1, {"w": torch.ones(2)}, {"step": 1}, keep_last=3)
    (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(Exception, match="refusing to unpickle"):
        ckpt.load(d, {"w": torch.zeros(2)})
    assert not (tmp_path / "pwned_by_checkpoint").exists()
