"""UNet wrapper: meta build + init, forward/backward/training, diffusers export, registry round trip."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from difftrain.config import ModelConfig
from difftrain.models import registry
from difftrain.models.unet import UNet, UNetConfig

TEXT_DIM, LEN, CLASSES, C, S = 16, 5, 10, 4, 8


def _config(form: str):
    mcfg = ModelConfig(name="UNet-T", image_size=S, in_channels=C, cond=form, num_classes=CLASSES,
                       args={"block_out_channels": [16, 32]})
    return registry.arch_config(mcfg, text_dim=TEXT_DIM)


def _batch(form: str, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, S, S, generator=g)
    t = torch.rand(b, generator=g)
    if form == "text":
        mask = torch.ones(b, LEN, dtype=torch.bool)
        mask[0, 3:] = False
        cond = {"text_states": torch.randn(b, LEN, TEXT_DIM, generator=g), "text_mask": mask}
    else:
        cond = {"class_labels": torch.tensor([3, CLASSES])[:b]}  # CLASSES = the null label
    return x, t, cond


def _diffusers_out(model, x, t, cond):
    if "text_states" in cond:
        return model(x, t * 1000, encoder_hidden_states=cond["text_states"], encoder_attention_mask=cond["text_mask"]).sample
    return model(x, t * 1000, class_labels=cond["class_labels"]).sample


@pytest.fixture(scope="module", params=["text", "class"])
def built(request):
    arch, cfg = _config(request.param)
    model = registry.materialize(registry.build(arch, cfg), "cpu", seed=0)
    return request.param, cfg, model


def test_config_from_registry():
    arch, cfg = _config("text")
    assert arch == "unet" and isinstance(cfg, UNetConfig)
    assert cfg.text_dim == TEXT_DIM and cfg.num_classes == 0 and cfg.block_out_channels == [16, 32]
    _, ccfg = _config("class")
    assert ccfg.num_classes == CLASSES and ccfg.text_dim == 0
    with pytest.raises(ValueError):
        UNetConfig(block_out_channels=[12], norm_num_groups=8)


def test_meta_init_is_sane(built):
    form, cfg, model = built
    eager = UNet(cfg)  # diffusers' own eager init, for reference statistics
    ours, ref = dict(model.named_parameters()), dict(eager.named_parameters())
    assert ours.keys() == ref.keys()
    for name, p in ours.items():
        assert p.device.type == "cpu" and p.shape == ref[name].shape, name
        assert torch.isfinite(p).all(), name
        if p.numel() >= 256:  # big weights: same spread as diffusers' init
            assert p.abs().sum() > 0, name
            ratio = p.std() / ref[name].std()
            assert 0.8 < ratio < 1.25, (name, ratio)
    assert type(model.inner).__name__ == ("UNet2DConditionModel" if form == "text" else "UNet2DModel")
    again = registry.materialize(registry.build("unet", cfg), "cpu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_blocks_are_the_trunk(built):
    form, cfg, model = built
    blocks = model.blocks
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2 * len(cfg.block_out_channels) + 1
    assert blocks[0] is model.inner.down_blocks[0] and blocks[-1] is model.inner.up_blocks[-1]
    assert blocks[len(cfg.block_out_channels)] is model.inner.mid_block
    assert all(k.startswith("inner.") for k in model.state_dict())  # blocks add no second key path
    assert "cross" in type(blocks[1]).__name__.lower() if form == "text" else "attn" in type(blocks[1]).__name__.lower()

    calls = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.wrapped = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.wrapped, name)

        def forward(self, *a, **kw):
            calls.append(1)
            return self.wrapped(*a, **kw)

    x, t, cond = _batch(form)
    with torch.no_grad():
        before = model(x, t, cond)
        original = model.blocks[1]
        model.replace_block(1, Spy(original))
        after = model(x, t, cond)
        model.replace_block(1, original)
    assert calls == [1] and torch.equal(before, after)


def test_forward_backward_and_training(built):
    form, cfg, model = built
    model = registry.materialize(registry.build("unet", cfg), "cpu", seed=1)
    x, t, cond = _batch(form)
    out = model(x, t, cond)
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = torch.randn_like(x, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = (model(x, t, cond) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_text_mask_hides_padding():
    _, cfg = _config("text")
    model = registry.materialize(registry.build("unet", cfg), "cpu", seed=0)
    x, t, cond = _batch("text")
    changed = dict(cond, text_states=cond["text_states"].clone())
    changed["text_states"][0, 3:] += 5.0  # only masked-out tokens of sample 0
    with torch.no_grad():
        a, b = model(x, t, cond), model(x, t, changed)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, C, 7, 7), torch.rand(1), {k: v[:1] for k, v in cond.items()})


def test_save_diffusers_matches_diffusers(built, tmp_path):
    import diffusers

    form, cfg, model = built
    cls_name = model.save_diffusers(model.state_dict(), tmp_path / "unet")
    assert (tmp_path / "unet" / "config.json").is_file()
    assert list((tmp_path / "unet").glob("*.safetensors"))
    ref = getattr(diffusers, cls_name).from_pretrained(str(tmp_path / "unet"), local_files_only=True).eval()
    x, t, cond = _batch(form)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), _diffusers_out(ref, x, t, cond), atol=1e-5, rtol=0)
    back = UNet.state_from_diffusers(ref.state_dict())
    assert back.keys() == model.state_dict().keys()


def test_registry_round_trip(built, tmp_path):
    form, cfg, model = built
    registry.save_pretrained(model, model.state_dict(), tmp_path / "export")
    loaded = registry.load_pretrained(tmp_path / "export")
    assert isinstance(loaded, UNet) and loaded.config == cfg
    x, t, cond = _batch(form)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond), atol=0, rtol=0)
