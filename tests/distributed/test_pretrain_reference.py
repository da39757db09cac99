"""Pre-training as one stage among others is bit-identical to the trainer before stages owned their modules.

``tests/data/pretrain_reference.json`` holds SHA-256 hashes of the model and EMA weights that the trainer of commit
be650c8 (before the stage seam) wrote after 8 steps of the small class-conditional config below, as one process (DDP),
as 2 FSDP2 ranks and as a 2-segment pipeline; each run here must reproduce them bit for bit. Hashes of float bytes
hold on one torch build and CPU type (kernels differ between CPUs): the file names the torch version (another one
skips) and holds one set per machine it was made on, be650c8 run there; a run must equal one of them. To add a
machine: check out be650c8, run its trainer on the config below in each layout, and hash with :func:`digest` of
``test_resume.weights``."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.conftest import REPO, run_cmd, torchrun
from tests.distributed.test_resume import weights

REF = json.loads((REPO / "tests/data/pretrain_reference.json").read_text())
CONFIG = ("configs/demo.yaml run.steps=8 run.ckpt_every=0 run.log_every=4 run.progress=false run.sample_every=0 "
          "model.name=DiT-T/2 model.cond=class model.num_classes=10 model.args.depth=2 model.args.hidden_size=64 "
          "model.args.num_heads=4 data.batch_size=8 data.num_workers=1 data.shuffle_buffer=16 optim.schedule=constant "
          "optim.warmup_steps=3 optim.lr=1e-3 encoders.text= eval.every=0").split()
LAYOUTS = {"one": (1, []), "fsdp": (2, ["parallel.engine=fsdp2"]),
           "pp": (2, ["parallel.pp=2", "parallel.pp_microbatches=2"])}


def digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__ != REF["torch"], reason=f"reference hashes are of torch {REF['torch']}")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pretrain_stage_reproduces_the_reference_weights(layout, digits, tmp_path):
    nproc, extra = LAYOUTS[layout]
    args = ["-m", "difftrain", "train", *CONFIG, f"data.train={digits['train']}", f"run.dir={tmp_path}", *extra]
    if nproc == 1:
        run_cmd(["python", *args])
    else:
        torchrun(nproc, args)
    for which in ("model", "ema"):
        step, sd = weights(tmp_path, which)
        assert step == 8
        known = {m["cpu"]: m["runs"][f"{layout}/{which}"] for m in REF["machines"]}
        assert digest(sd) in known.values(), f"{layout} {which} weights differ from be650c8's on {', '.join(known)}"
