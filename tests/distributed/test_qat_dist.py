"""QAT under the real launcher (issue 18): a digits base trained briefly, then quantisation-aware fine-tuning from it
with static activation step sizes per t-interval (calibrated over the first two forwards) and, in another run, TDQ's
step sizes as a function of t with QALoRA (LoRA inside the weight quantiser). 2 ranks under DDP and FSDP2 end where one
process does (calibration takes its maximum over the data-parallel ranks, and writes buffers only, so FSDP2's
sharded parameters are never written from inside a forward); a pipelined run (pp = 2, t on the wire between
segments) ends where one process with the same micro-batches (``optim.grad_accum=2``) does: calibration sees the
micro-batches in turn, as accumulation does. torchao's int4 weight scheme (its fake quantizer: scales from the
unsharded weight in each forward) under FSDP2 equals one process after a step: FSDP2 all-gathers plain float weights
and the quantizers run on the gathered weight, so torchao's FSDP2 limits for quantised tensor subclasses (ao#1224)
never arise during training. After more steps it drifts apart (measured 1e-3 after 4 steps, while our LSQ W4 runs
agree to 1e-5): its scales follow the weights, so a weight an ulp apart between 1 and 2 ranks can move a whole
group to the next grid, which AdamW amplifies; its dynamic per-token activations train under FSDP2 as well."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import torchrun
from tests.distributed.test_consistency_dist import assert_close
from tests.distributed.test_distill_stages import SMALL
from tests.distributed.test_resume import checkpoint, part

pytestmark = pytest.mark.slow  # ~3 min alone: tests/unit/test_qat.py covers the quantisers, QALoRA and segments

# JSON (valid YAML without spaces: train_job splits the overrides on whitespace)
QAT = ('adapt=[{"kind":"qat","weight_bits":4,"act_bits":8,"t_intervals":4,"calibrate":2,"act_symmetric":false}] '
       'optim.lr=1e-3 run.steps=4')
QALORA = ('adapt=[{"kind":"qat","weight_bits":4,"act_bits":8,"tdq":true},{"kind":"lora","rank":4}] '
          'optim.lr=1e-2 run.steps=4')
TORCHAO = ('adapt=[{"kind":"qat","scheme":"int4_weight","weight_bits":4,"granularity":"group","group_size":32}] '
           'optim.lr=1e-3 run.steps=1 optim.warmup_steps=0')  # torchao's int4 fake quantizer: one step (below)
DYNAMIC = ('adapt=[{"kind":"qat","scheme":"int8_dynamic","weight_bits":8,"act_bits":8,"act_symmetric":false}] '
           'optim.lr=1e-3 run.steps=4')  # and its dynamic per-token activations
PP = "parallel.pp=2 parallel.pp_microbatches=2"


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat")
    base = f"{SMALL} data.train={digits['train']}"
    qat, qalora = f"{base} {QAT} init_from={out}/base@ema", f"{base} {QALORA} init_from={out}/base@ema"
    torchao = f"{base} {TORCHAO} init_from={out}/base@ema"
    dynamic = f"{base} {DYNAMIC} init_from={out}/base@ema"
    torchrun(1, ["tests/distributed/train_job.py", str(out / "single"),
                 "base", f"{base} run.steps=6 run.dir={out}/base",
                 "qat", f"{qat} run.dir={out}/qat_single",
                 "qat_accum", f"{qat} optim.grad_accum=2 run.dir={out}/qat_accum",
                 "qalora", f"{qalora} run.dir={out}/qalora_single",
                 "torchao", f"{torchao} run.dir={out}/torchao_single"])
    torchrun(2, ["tests/distributed/train_job.py", str(out / "two"),
                 "qat_ddp", f"{qat} run.dir={out}/qat_ddp",
                 "qat_fsdp2", f"{qat} parallel.engine=fsdp2 run.dir={out}/qat_fsdp2",
                 "qat_pp", f"{qat} {PP} run.dir={out}/qat_pp",
                 "qalora_fsdp2", f"{qalora} parallel.engine=fsdp2 run.dir={out}/qalora_fsdp2",
                 "torchao_fsdp2", f"{torchao} parallel.engine=fsdp2 run.dir={out}/torchao_fsdp2",
                 "dynamic_fsdp2", f"{dynamic} parallel.engine=fsdp2 run.dir={out}/dynamic_fsdp2"])
    return out


@pytest.mark.parametrize("run,ref", [("qat_ddp", "qat_single"), ("qat_fsdp2", "qat_single"),
                                     ("qat_pp", "qat_accum"), ("qalora_fsdp2", "qalora_single"),
                                     ("torchao_fsdp2", "torchao_single")])
def test_two_ranks_equal_one_process(runs, run, ref):
    (one, s1), (two, s2) = checkpoint(runs / ref), checkpoint(runs / run)
    assert s1["step"] == s2["step"] == (1 if ref == "torchao_single" else 4)
    model1, model2 = part(one, "model.backbone."), part(two, "model.backbone.")
    steps = [k for k in model1 if k.endswith("act_quant.step0")]
    assert steps or ref == "torchao_single"
    assert all(model1[k.replace("step0", "calibrated")].item() == (2 if "qat" in ref else 1)
                         for k in steps)  # calibrated over its forwards, and saved
    assert_close(model1, model2, f"{run} model")
    assert_close(part(one, "ema.backbone."), part(two, "ema.backbone."), f"{run} EMA")
    if ref == "qat_single":  # per-interval step sizes that differ (one step size per t-interval, calibrated apart)
        assert any(len(set(model1[k].tolist())) > 1 for k in steps)
    if ref == "qalora_single":  # QALoRA: the base weights are not in the checkpoint (read from init_from)
        assert any(".lora_B." in k for k in model1) and any(".tdq." in k for k in model1)
        assert not any(k.endswith("attn.qkv.base_layer.weight") for k in model1)


def test_dynamic_activations_train_under_fsdp2(runs):
    """torchao's dynamic per-token activations under FSDP2: the run trains (weights finite and moved from the base).
    Not compared with one process: each token is rounded at every forward, and an activation on a rounding edge lands
    one step apart when 2 ranks multiply in another blocking than 1 (an ulp), which AdamW turns into visible weight
    differences (measured up to 5e-4 after 4 steps); the weight quantizer's FSDP2 path is the int4_weight case's."""
    (two, s2), (base, _) = checkpoint(runs / "dynamic_fsdp2"), checkpoint(runs / "base")
    assert s2["step"] == 4
    model, before = part(two, "model.backbone."), part(base, "ema.backbone.")
    assert all(torch.isfinite(v).all() for v in model.values())
    assert max((model[k] - before[k]).abs().max().item() for k in before) > 1e-4
