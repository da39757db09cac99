"""Tensor parallelism's one-line refusals (parallelism/tensor_parallel.py, config_checks), before any process group:
a tp that does not divide the heads or the MLP width, a model that is not a DiT, an adapted model, an engine other
than fsdp2, and tp inside pipeline segments. Its equality with one process: tests/distributed/test_equivalence.py."""
from __future__ import annotations

import pytest

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.parallelism.tensor_parallel import COLUMN_PARALLEL, ROW_PARALLEL, check_tp, tp_plan
from tests.unit.test_parallelize_single import build


def test_the_plan_splits_heads_mlp_and_modulation_and_leaves_the_rest_whole():
    block = build("dit-class").blocks[0]
    assert set(tp_plan(block)) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN.1"}
    text = build("dit-text").blocks[0]  # adaLN-single: a table, not split; cross-attention split like attention
    assert set(tp_plan(text)) == {"attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj",
                                  "mlp.fc1", "mlp.fc2"}
    for impl in ("dtensor", "megatron"):  # the names the planner's bytes (memory.py) split, by direction
        for name, style in {**tp_plan(block, impl), **tp_plan(text, impl)}.items():
            row = type(style).__name__ in ("RowwiseParallel", "MegatronRow")
            assert name.endswith(ROW_PARALLEL if row else COLUMN_PARALLEL), (impl, name)


def test_a_tp_that_does_not_divide_the_heads_is_one_line():
    model = build("dit-class")  # 2 heads, MLP 128
    check_tp(model, 2)
    with pytest.raises(ConfigError, match=r"'parallel.tp' = 4 must divide model.args.num_heads = 2"):
        check_tp(model, 4)


def test_a_unet_or_an_adapted_dit_is_refused():
    with pytest.raises(ConfigError, match="UNet.* is not a DiT"):
        check_tp(build("unet-class"), 2)
    from difftrain.finetune.lora import LoRA, LoRAArgs

    model = build("dit-class")
    LoRA(LoRAArgs(rank=2, targets=["attn"])).apply(model)
    with pytest.raises(ConfigError, match="the model is adapted"):
        check_tp(model, 2)


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tp=2"], "composes with fsdp2"),
    (["parallel.tp=2", "parallel.engine=deepspeed"], "composes with fsdp2"),
])
def test_tp_needs_fsdp2(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_apex_asked_for_and_absent_is_one_line_and_auto_falls_back():
    """NVIDIA apex (train/apex.py) is not importable on this machine: ``optim.impl=apex`` is refused before any process
    group; ``auto`` (the default) and ``torch`` train with torch's fused AdamW."""
    from difftrain.train import apex

    if apex.importable():
        pytest.skip("apex imports here")
    with pytest.raises(ConfigError, match=r"'optim.impl' = apex: NVIDIA apex is not importable"):
        load_config(None, ["optim.impl=apex"])
    import torch

    assert not apex.wanted("auto", torch.device("cpu")) and not apex.wanted("torch", torch.device("cpu"))


@pytest.mark.parametrize("overrides", [["parallel.sp=true"],
                                       ["parallel.engine=fsdp2", "parallel.tp=2", "parallel.sp=true",
                                        "parallel.tp_impl=megatron"],
                                       ["parallel.engine=fsdp2", "parallel.tp=2", "parallel.sp=true", "parallel.pp=2"]])
def test_sequence_parallelism_needs_dtensor_tp_without_a_pipeline(overrides):
    with pytest.raises(ConfigError, match="'parallel.sp' needs parallel.tp > 1 with tp_impl dtensor and pp 1"):
        load_config(None, overrides)
