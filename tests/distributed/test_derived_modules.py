"""A stage's derived module (a target network: a copy of a trainable module with its own update rule) under the
real launcher: built sharded like its original, checkpointed as ``derived.NAME.*``, resumed bitwise after SIGKILL
together with the stage's own non-tensor state, and equal on 2 FSDP2 ranks and one process."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from difftrain.models import registry
from difftrain.train import checkpoint as ckpt
from difftrain.train.build import read_model_config
from tests.conftest import run_cmd, torchrun
from tests.distributed.test_resume import COMMON, assert_same

ARGS = [*COMMON, "stage=target_test", "run.steps=8", "run.ckpt_every=4", "optim.eps=1e-6", "data.streams=2"]


def derived(run_dir) -> tuple[dict, dict]:
    d = ckpt.latest_checkpoint(run_dir / "checkpoints")
    arch, acfg = read_model_config(run_dir)
    names = registry.build(arch, acfg).state_dict()
    tensors = {"derived": {"target": {k: torch.empty(v.shape) for k, v in names.items()}},
               "model": {"backbone": {k: torch.empty(v.shape) for k, v in names.items()}}}
    ckpt.load_tensors(d, tensors)
    return tensors, ckpt.read_train_state(d)


@pytest.mark.slow
def test_a_derived_module_is_sharded_checkpointed_and_resumed_bitwise(digits, tmp_path):
    job = ["tests/distributed/derived_job.py", *ARGS, f"data.train={digits['train']}"]
    run_cmd([sys.executable, *job, f"run.dir={tmp_path}/one"])
    torchrun(2, [*job, "parallel.engine=fsdp2", f"run.dir={tmp_path}/two"])
    p = torchrun(2, [*job, "parallel.engine=fsdp2", f"run.dir={tmp_path}/killed"],
                 env={"DIFFTRAIN_FAULT": "kill_at_step:6:1"}, check=False)
    assert p.returncode != 0
    torchrun(2, [*job, "parallel.engine=fsdp2", f"run.dir={tmp_path}/killed"])
    (one, s1), (two, s2), (killed, s3) = (derived(tmp_path / r) for r in ("one", "two", "killed"))
    assert s1["modules"] == {"backbone": "trainable", "target": "derived"}
    assert s1["stage_state"] == s2["stage_state"] == s3["stage_state"] == {"updates": 8}
    assert_same(two["derived"]["target"], killed["derived"]["target"])  # resumed bitwise
    assert_same(one["derived"]["target"], two["derived"]["target"], tol=1e-5)  # sharded copy and update = one process
    target, live = one["derived"]["target"], one["model"]["backbone"]
    assert any(not torch.equal(target[k], live[k]) for k in target)  # it lags the backbone
    meta = (ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints") / ".metadata").read_bytes()
    assert b"derived.target." in meta and json.dumps(s2["frozen"]) == "{}"
