"""Distribution matching distillation's generator gradient (DMD eq. 7-8) through the stage's own wiring: zero when
the fake score equals the real one, the normalised score difference otherwise, and the alternation of the two
networks by step."""
import pytest
import torch
from torch import nn

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from tests.unit.stage_builds import stage_with_teacher


class _Affine(nn.Module):
    """A velocity model v = scale * x + shift (any t, any cond): enough to give the two scores known values."""

    def __init__(self, scale=0.5, shift=0.0):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.tensor(scale)), nn.Parameter(torch.tensor(shift))

    def forward(self, x, t, cond):
        return self.scale * x + self.shift


def _stage(tmp_path, *extra):
    return stage_with_teacher(tmp_path, "dmd", "stage_args.fake_updates=2", "diffusion.path=rf",
                              "diffusion.target=velocity", "run.seed=1", *extra)


def _generator_grad(stage, fake_shift):
    gen, teacher, fake = _Affine(0.3), _Affine(0.5), _Affine(0.5, fake_shift)
    stage.bind({"generator": gen, "fake": fake, "teacher": teacher})
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    prep = stage.prepare({"x0": x0, "index": torch.arange(6), "cond": {}}, step=2)  # 2 % 3 == 2: generator step
    assert prep["generator"]
    loss, per = stage.loss(stage.forward(prep), prep)
    loss.backward()
    return gen, prep, loss


def test_generator_gradient_is_zero_when_the_fake_score_is_the_real_one(tmp_path):
    stage, _ = _stage(tmp_path)
    gen, _, loss = _generator_grad(stage, 0.0)
    assert float(loss.detach()) == 0.0 and float(gen.scale.grad) == 0.0 and float(gen.shift.grad) == 0.0


def test_generator_gradient_is_the_normalised_score_difference(tmp_path):
    """fake - real = t * c for velocity models v = a x + b vs a x + b + c (x0^ = x_t - t v): the surrogate's
    gradient in G(z) is g = (x0_fake - x0_real) / mean|G(z) - x0_real| / D per element (mean over D elements)."""
    stage, diffusion = _stage(tmp_path)
    c = 0.1
    gen, prep, _ = _generator_grad(stage, c)
    z, t, eps = prep["z"].double(), prep["t"].double(), prep["eps"].double()
    x_g = z - 1.0 * (0.3 * z)  # x0^ = z - 1 * v at t = 1
    tt = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tt) * x_g + tt * eps
    real = x_t - tt * (0.5 * x_t)
    scale = (x_g - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    g = (-tt * c) / scale  # x0_fake - x0_real = -t c
    d = x_g[0].numel()
    dloss_dxg = g / d / len(x_g)
    # G(z) = z - (s z + b): dG/ds = -z, dG/db = -1
    torch.testing.assert_close(gen.scale.grad.double(), (dloss_dxg * -z).sum(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(gen.shift.grad.double(), (-dloss_dxg).expand_as(z).sum(), rtol=1e-4, atol=1e-9)


def test_fake_steps_denoise_the_generators_samples(tmp_path):
    stage, diffusion = _stage(tmp_path)
    gen, teacher, fake = _Affine(0.3), _Affine(0.5), _Affine(0.5)
    stage.bind({"generator": gen, "fake": fake, "teacher": teacher})
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert [stage.generator_step(k) for k in range(6)] == [False, False, True, False, False, True]
    prep = stage.prepare({"x0": x0, "index": torch.arange(6), "cond": {}}, step=0)
    torch.testing.assert_close(prep["x0"], prep["z"] - 0.3 * prep["z"])  # the generator's samples, not the data
    loss, _ = stage.loss(stage.forward(prep), prep)
    loss.backward()
    assert gen.scale.grad is None and fake.scale.grad is not None  # only the fake score learns on its steps


@pytest.mark.parametrize("extra, words", [([], None),
                                          (["diffusion.target=eps"], "diffusion.target"),
                                          (["stage_args.t_min=0.9", "stage_args.t_max=0.5"], "t_min"),
                                          (["stage_args.regression=1"], "pairs")])
def test_dmd_config_checks(tmp_path, extra, words):
    args = ["stage=dmd", f"stage_args.teacher={tmp_path}", *extra]
    if words is None:
        with pytest.raises(ConfigError, match="stage_args.teacher"):
            load_config(None, ["stage=dmd"])
        from difftrain.train.stages import STAGES

        cfg = load_config(None, args)
        assert set(STAGES["dmd"].roles(cfg)) == {"generator", "fake", "teacher"}
        return
    with pytest.raises(ConfigError, match=words):
        load_config(None, args)
