"""Runs inside torchrun: several short training runs in the same processes (one launch, many
cases), each given as NAME and dotted overrides; rank 0 writes each run's final full weights to
OUT/NAME.safetensors. Usage: train_job.py OUT NAME1 '[CONFIG.yaml] k=v k=v' NAME2 'k=v ...'"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from difftrain.config_checks import load_config
from difftrain.eval.validate import Validation
from difftrain.parallelism.tensor_parallel import full_tensor
from difftrain.sampling import SampleGrid
from difftrain.train.trainer import Trainer


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    cases = sys.argv[2:]
    for name, overrides in zip(cases[::2], cases[1::2]):
        words = overrides.split()  # a leading FILE.yaml is the config the overrides apply to
        path, words = (words[0], words[1:]) if words and words[0].endswith(".yaml") else (None, words)
        cfg = load_config(path, words)
        trainer = Trainer(cfg, callbacks=[SampleGrid(), Validation()])
        trainer.fit()
        served = trainer.engine.models[trainer.stage.served]
        if cfg.parallel.tp > 1:  # DTensor's full_tensor does not undo FSDP2 over tp's strided q/k/v rows
            sd = {k: full_tensor(v).cpu() for k, v in get_model_state_dict(served).items()}
        else:
            sd = get_model_state_dict(served, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = trainer.engine.ema.shadow.values()
        local = sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in ema)
        sizes = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, {"local": local, "full": sum(t.numel() for t in ema)})
        pp = trainer.pp_step
        plan = None if pp is None else {  # where the pipeline put the frozen work, and what this rank holds
            "owners": {k: sorted(v) for k, v in (pp.owners or {}).items()},
            "offloaded": len(trainer.engine.offloaded),
            "placement": sorted({c.name for cs in (pp.placement or {}).values() for c in cs}),
            "current": sorted({c.name for _, c, _ in (pp.current or {}).get(trainer.engine.pp_rank, [])})}
        plans = [None] * dist.get_world_size()
        dist.all_gather_object(plans, plan)
        if dist.get_rank() == 0:
            (out / f"{name}.ema_numel.json").write_text(json.dumps(sizes))
            (out / f"{name}.pp.json").write_text(json.dumps(plans))
            save_file({k: v.contiguous() for k, v in sd.items()}, str(out / f"{name}.safetensors"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
