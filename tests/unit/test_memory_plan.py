"""``parallelism/memory.py``: the per-rank bytes ``predict`` gives for each engine against the bytes a real engine holds
on one process (gloo, world 1; benchmarks/engines.py checks 2 ranks), the tensor-parallel split of a DiT block, and
ZeRO's sec. 5.1 ratios at 64 ranks on DiT-XL/2."""
from __future__ import annotations

import math

import pytest
import torch

from difftrain.config import OptimConfig, ParallelConfig
from difftrain.models.dit import DiT, DiTConfig
from difftrain.parallelism.dims import Meshes, ParallelDims
from difftrain.parallelism.memory import CASES, EngineCase, held_bytes, predict, shapes_of, tp_shape

KINDS = ("params", "grads", "optimizer", "ema")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One gloo group of 1 for every engine here: DeepSpeed keeps a clone of the world group it first saw
    (``deepspeed.utils.groups._WORLD_GROUP``), so it is forgotten with the group at the end."""
    import torch.distributed as dist

    mine = not dist.is_initialized()  # an earlier test's group (the in-process trainers') is left as it was
    if mine:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/pg", rank=0,
                                world_size=1)
    yield
    if mine:
        dist.destroy_process_group()
        import deepspeed.utils.groups

        deepspeed.utils.groups._WORLD_GROUP = None


def _dit(modulation: str = "zero") -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(image_size=8, in_channels=2, num_classes=0, text_dim=32, hidden_size=64, depth=2,
                         num_heads=4, modulation=modulation))


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 2, 8, 8, generator=g), torch.rand(2, generator=g),
            {"text_states": torch.randn(2, 5, 32, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.bool)})


def _engine(case: EngineCase, model: DiT, threshold: int):
    pcfg = ParallelConfig(engine=case.engine, zero_stage=max(case.zero_stage, 1), zero_persistence_threshold=threshold)
    ocfg = OptimConfig(lr=1e-3)
    device = torch.device("cpu")
    if case.engine == "deepspeed":
        from difftrain.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine("model", model, pcfg, ocfg, device, total_steps=10, batch_size=2, dp=1)
    from difftrain.train.engine import TorchEngine

    dims = ParallelDims.from_config(pcfg, 1)
    return TorchEngine({"model": model}, Meshes(dims, dims.build_mesh("cpu")), pcfg, ocfg, device, total_steps=10)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_predict_matches_a_real_engine(world, name):
    """After one applied step (AdamW's state exists) and the next backward: every kind within 1% of the counted
    bytes (exact for torch's engines; DeepSpeed's flat-buffer alignment and gradient views are what is left)."""
    case = next(c for c in CASES if c.name == name)
    threshold = 1000  # ZeRO-3: the small parameters whole, the others partitioned
    model = _dit()
    shapes = shapes_of(model)
    engine = _engine(case, model, threshold)
    x, t, cond = _batch()
    for _ in range(2):
        loss = engine.model(x, t, cond).square().mean()
        engine.backward(loss)
        if _ == 0:
            engine.step(0, loss.detach())
    got = held_bytes(engine)
    want = predict(shapes, case, world=1, persistence_threshold=threshold).with_host()
    psi = sum(math.prod(s) for s in shapes.values())
    assert got["params"] >= 4 * psi  # the counter saw every parameter
    for k in KINDS:
        if case.engine == "deepspeed":
            assert want[k] == pytest.approx(got[k], rel=0.01), k
        else:
            assert want[k] == got[k], k


def test_tp_split_of_a_dit_block():
    """Megatron's split (tensor_parallel.tp_plan): column-parallel rows and bias, row-parallel weight columns, the
    rest whole."""
    shapes = shapes_of(_dit())
    assert tp_shape("blocks.0.attn.qkv.weight", shapes["blocks.0.attn.qkv.weight"], 2) == (96, 64)
    assert tp_shape("blocks.0.attn.qkv.bias", shapes["blocks.0.attn.qkv.bias"], 2) == (96,)
    assert tp_shape("blocks.1.cross_attn.kv.weight", shapes["blocks.1.cross_attn.kv.weight"], 2) == (64, 64)
    assert tp_shape("blocks.0.mlp.fc2.weight", shapes["blocks.0.mlp.fc2.weight"], 2) == (64, 128)
    assert tp_shape("blocks.0.mlp.fc2.bias", shapes["blocks.0.mlp.fc2.bias"], 2) == (64,)
    assert tp_shape("blocks.0.adaLN.1.weight", shapes["blocks.0.adaLN.1.weight"], 2) == (192, 64)
    assert tp_shape("final_layer.adaLN.1.weight", shapes["final_layer.adaLN.1.weight"], 2) == (128, 64)
    tp2 = predict(shapes, EngineCase("tp2", "fsdp2", tp=2), world=2)
    whole = predict(shapes, EngineCase("fsdp2", "fsdp2"), world=1)
    assert 0.5 * whole.params < tp2.params < 0.6 * whole.params  # the blocks hold nearly all of it


def test_zero_ratios_at_scale():
    """DiT-XL/2 over 64 ranks: the paper's 5.1 counts with fp32 weights and grads, K = 12 for ZeRO (fp32 master + two
    moments), 8 for torch's AdamW, and the EMA: (4 + 4 + 8 + 4) Psi for DDP, ... / 64 for ZeRO-3 and FSDP2."""
    with torch.device("meta"):
        model = DiT(DiTConfig(image_size=32, in_channels=4, num_classes=0, text_dim=4096, hidden_size=1152,
                              depth=28, num_heads=16))
    shapes = shapes_of(model)
    psi = sum(math.prod(s) for s in shapes.values())
    N = 64
    by = {c.name: predict(shapes, c, N) for c in CASES}
    assert by["ddp"].total == pytest.approx(20 * psi, rel=1e-4)
    assert by["zero1"].total == pytest.approx(4 * psi + 4 * psi + (4 + 12) * psi / N, rel=1e-3)
    assert by["zero2"].total == by["zero1"].total  # at the end of the backward both hold the gradient partition
    assert by["zero3"].total == pytest.approx((4 + 4 + 12 + 4) * psi / N, rel=0.02)
    assert by["fsdp2"].total == pytest.approx(20 * psi / N, rel=0.02)
    off = by["zero3_offload"]
    assert off.optimizer == 0 and off.grads == 0 and off.host["optimizer"] == pytest.approx(12 * psi / N, rel=0.02)


def test_plan_engines_table(capsys):
    """``difftrain plan CONFIG --engines``: a row per engine; ZeRO-1/2 timed as DDP, ZeRO-3 as FSDP2, offload and TP
    not simulated."""
    from difftrain.cli import main

    main(["plan", "configs/demo.yaml", "--gpus", "2", "--engines"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.split("engines on 2 x")[1].split("\n\n")[0].splitlines() if line.startswith("| ")}
    assert set(rows) == {c.name for c in CASES} | {"engine"}
    assert rows["zero1"][3] == rows["zero2"][3] == rows["ddp"][3] != "not simulated"
    assert rows["zero3"][3] == rows["fsdp2"][3]
    assert rows["tp2"][3] == rows["zero3_offload"][3] == "not simulated"
    assert float(rows["zero3"][0]) <= float(rows["zero2"][0]) <= float(rows["zero1"][0]) <= float(rows["ddp"][0])
