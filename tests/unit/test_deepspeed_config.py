"""``parallel.engine=deepspeed`` config (train/deepspeed_engine.py): DeepSpeed's config is built from ours (batch split
as our trainer splits it, clipping, ZeRO stage, CPU offload, fp32), and the keys that do not go with it fail in one line naming
the key. The engine itself runs under the real launcher: tests/distributed/test_deepspeed_dist.py (slow)."""
from __future__ import annotations

import pytest

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.train.deepspeed_engine import DeepSpeedEngine, ds_config
from difftrain.train.engine import ENGINES
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


def test_deepspeed_is_a_registered_engine():
    assert ENGINES["deepspeed"] is DeepSpeedEngine


def test_deepspeed_config_is_built_from_ours():
    cfg = load_config(DEMO, ["parallel.engine=deepspeed", "parallel.zero_stage=3", "data.batch_size=24",
                             "optim.grad_accum=3", "optim.grad_clip=0.5"])
    got = ds_config(cfg.parallel, cfg.optim, cfg.data.batch_size, dp=2)
    assert got["train_micro_batch_size_per_gpu"] == 4 and got["gradient_accumulation_steps"] == 3
    assert got["train_batch_size"] == 24 and got["gradient_clipping"] == 0.5
    assert got["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 100000,
                                        "memory_efficient_linear": False}  # it would patch F.linear process-wide
    assert not {"fp16", "bf16", "scheduler", "optimizer"} & set(got)  # fp32; our AdamW and LR table


@pytest.mark.parametrize("stage, params", [(1, False), (2, False), (3, False), (3, True)])
def test_cpu_offload_goes_into_deepspeeds_config(stage, params):
    cfg = load_config(DEMO, ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}",
                             "parallel.zero_offload_optimizer=true", f"parallel.zero_offload_params={params}"])
    zero = ds_config(cfg.parallel, cfg.optim, cfg.data.batch_size, dp=1)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"}
    assert zero.get("offload_param") == ({"device": "cpu"} if params else None)


@pytest.mark.parametrize("overrides, key", [
    (["parallel.engine=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=0"], "parallel.zero_stage"),
    (["parallel.zero_stage=2"], "parallel.zero_stage"),  # a ZeRO stage without the deepspeed engine
    (["parallel.engine=deepspeed", "parallel.pp=2"], "parallel.pp"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.zero_offload_params=true"],
     "parallel.zero_offload_params"),  # only ZeRO-3 partitions the parameters
    (["parallel.zero_offload_optimizer=true"], "parallel.zero_offload_optimizer"),  # without the deepspeed engine
    (["parallel.engine=fsdp2", "parallel.zero_offload_params=true"], "parallel.zero_offload_params"),
])
def test_keys_that_do_not_go_with_deepspeed_fail_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    msg = str(e.value)
    assert f"config key '{key}'" in msg and "\n" not in msg, msg
