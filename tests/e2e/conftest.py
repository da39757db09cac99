import json
import sys

import pytest

from tests.conftest import run_cmd, torchrun

STEPS = 60


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """One cache (the digits classifier, reference features) for every eval in the tests."""
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, eval_cache):
    """data demo -> torchrun (2 gloo ranks) train, with validation on the held-out split."""
    root = tmp_path_factory.mktemp("e2e")
    p = run_cmd([sys.executable, "-m", "difftrain", "data", "demo", "--out", str(root / "digits")])
    info = json.loads(p.stdout)
    assert info["train"] == str(root / "digits" / "train" / "{00000..00006}.tar")  # what configs/demo.yaml names
    assert info["val"] == str(root / "digits" / "val" / "{00000..00000}.tar")
    torchrun(2, ["-m", "difftrain", "train", "configs/demo.yaml", f"run.dir={root / 'run'}", f"data.train={info['train']}",
                 f"run.steps={STEPS}", "run.log_every=10", "run.ckpt_every=30", f"run.sample_every={STEPS}",
                 "run.sample_num=4", "run.sample_steps=4", "optim.lr=1e-3", "optim.warmup_steps=10",
                 "data.batch_size=32", f"eval.ref={info['val']}", "eval.every=30", "eval.num=40", "eval.steps=4",
                 "eval.loss_samples=24"], env={"DIFFTRAIN_CACHE": str(eval_cache)})
    return root
