"""A stage built in-process for tests of its step math: from config overrides, with a real teacher folder (random
weights, written by ``registry.save_pretrained``) as its ``stage_args.teacher``, on the CPU."""
import torch

from difftrain.config_checks import load_config


def stage_with_teacher(tmp_path, stage: str, *overrides: str):
    """(the stage, its Diffusion); the live modules are the test's to ``bind``."""
    from difftrain.diffusion.diffusion import build_diffusion
    from difftrain.models import registry
    from difftrain.train.build import Shared
    from difftrain.train.stages import STAGES, stage_args

    folder = tmp_path / "teacher"
    arch, acfg = registry.arch_config(load_config(None, ["model.name=DiT-T/2", "model.args.depth=1"]).model, 0)
    model = registry.materialize(registry.build(arch, acfg), "cpu", seed=0)
    registry.save_pretrained(model, model.state_dict(), folder)  # a real source folder (weights unused here)
    cfg = load_config(None, [f"stage={stage}", f"stage_args.teacher={folder}", *overrides])
    diffusion = build_diffusion(cfg.diffusion)
    return STAGES[stage](Shared.parts(cfg, torch.device("cpu"), diffusion=diffusion), stage_args(cfg)), diffusion
