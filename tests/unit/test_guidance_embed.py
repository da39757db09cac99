"""The guidance scale as a model input (``guidance_embed``): DiT, video DiT and UNet start exactly as the same model
without it, read ``cond["guidance"]``, export (UNet: diffusers' time_cond_proj_dim) or refuse to (DiT)."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from difftrain.config import ConfigError, ModelConfig
from difftrain.models import registry
from difftrain.models.dit import DiT, DiTConfig
from difftrain.models.dit_export import ExportError, export_dit_diffusers
from difftrain.models.dit_video import VideoDiT, VideoDiTConfig
from difftrain.models.unet import GUIDANCE_EMBED_DIM, UNet, guidance_scale_embedding
from difftrain.parallelism.pipeline.segments import cond_keys, make_segment

CLASSES, TEXT_DIM, L = 5, 12, 4


def _cond(cfg, b, g):
    cond = {"guidance": 1.0 + 6.0 * torch.rand(b, generator=g)}
    if cfg.num_classes:
        cond["class_labels"] = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
    if cfg.text_dim:
        mask = torch.ones(b, L, dtype=torch.bool)
        mask[0, 2:] = False
        cond.update(text_states=torch.randn(b, L, cfg.text_dim, generator=g), text_mask=mask)
    return cond


def _build(arch, cfg, seed=0):
    return registry.materialize(registry.build(arch, cfg), "cpu", seed=seed)


def _perturb(model, seed=0, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if only is None or n.startswith(only):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


DIT_FORMS = {
    "class": (DiT, DiTConfig, dict(num_classes=CLASSES, text_dim=0)),
    "text": (DiT, DiTConfig, dict(num_classes=0, text_dim=TEXT_DIM)),
    "video": (VideoDiT, VideoDiTConfig, dict(num_classes=CLASSES, text_dim=0, frames=4, temporal_patch=2,
                                             attention="factorized")),
}


def _dit(form, flag, seed=0):
    cls, ccls, kw = DIT_FORMS[form]
    cfg = ccls(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, guidance_embed=flag,
               **kw)
    return _build("dit_video" if cls is VideoDiT else "dit", cfg, seed)


def _x(model, b, g):
    cfg = model.config
    frames = getattr(cfg, "frames", 0)
    return torch.randn(b, *((frames,) if frames else ()), 3, 8, 8, generator=g)


@pytest.mark.parametrize("form", sorted(DIT_FORMS))
def test_dit_starts_as_the_model_without_the_flag(form):
    plain, guided = _dit(form, False), _dit(form, True)
    assert isinstance(guided.g_embed, torch.nn.Module) and plain.g_embed is None
    extra = set(guided.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("g_embed.") for k in extra)
    common = plain.state_dict()
    assert all(torch.equal(v, guided.state_dict()[k]) for k, v in common.items())  # same seed, same weights
    assert list(guided.state_dict())[: len(common)] == list(common)  # new keys come last
    # trained weights (all but the guidance embedder's): still identical outputs, whatever w
    _perturb(plain)
    guided.load_state_dict(plain.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    x, t, cond = _x(plain, 3, g), torch.rand(3, generator=g), _cond(plain.config, 3, g)
    with torch.no_grad():
        assert torch.equal(guided(x, t, cond), plain(x, t, cond))


def test_dit_guidance_is_used_and_learns():
    model = _perturb(_dit("class", True), only="blocks")  # zero-init gates / head opened: gradients reach g_embed
    _perturb(model, seed=1, only="final_layer")
    g = torch.Generator().manual_seed(2)
    x, t, cond = _x(model, 2, g), torch.rand(2, generator=g), _cond(model.config, 2, g)
    model(x, t, cond).square().mean().backward()
    assert model.g_embed.mlp[2].weight.grad.abs().sum() > 0
    _perturb(model, seed=3, only="g_embed")
    with torch.no_grad():
        a = model(x, t, cond)
        b = model(x, t, dict(cond, guidance=cond["guidance"] + 1.0))
        c = model(x, t, dict(cond, guidance=torch.tensor(3.0)))  # a scalar is broadcast to the batch
        d = model(x, t, dict(cond, guidance=torch.full((2,), 3.0)))
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


@pytest.mark.parametrize("form", ["class", "video"])
def test_dit_missing_guidance_is_a_clear_error(form):
    model = _dit(form, True)
    g = torch.Generator().manual_seed(0)
    cond = _cond(model.config, 1, g)
    del cond["guidance"]
    with pytest.raises(ValueError, match=r"cond\['guidance'\] is required: the model has guidance_embed=True"):
        model(_x(model, 1, g), torch.rand(1), cond)


def test_dit_config_from_model_args_and_round_trip(tmp_path):
    mcfg = ModelConfig(name="DiT-T/2", image_size=8, in_channels=3, cond="class", num_classes=CLASSES,
                       args={"guidance_embed": True})
    arch, acfg = registry.arch_config(mcfg)
    assert arch == "dit" and acfg.guidance_embed is True
    with pytest.raises(ConfigError, match="model.args.guidance_embed"):
        DiTConfig(image_size=8, in_channels=3, num_classes=0, text_dim=0, guidance_embed="yes")
    model = _perturb(_build(arch, acfg))
    registry.save_pretrained(model, model.state_dict(), tmp_path / "export")
    loaded = registry.load_pretrained(tmp_path / "export")
    assert loaded.config == acfg
    g = torch.Generator().manual_seed(0)
    x, t, cond = _x(model, 2, g), torch.rand(2, generator=g), _cond(acfg, 2, g)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


@pytest.mark.parametrize("form", ["class", "text"])
def test_dit_export_refuses_the_flag(form, tmp_path):
    model = _dit(form, True)
    for export in (lambda: export_dit_diffusers(model, model.state_dict(), tmp_path / "out"),
                   lambda: model.save_diffusers(model.state_dict(), tmp_path / "out")):
        with pytest.raises(ExportError, match="cannot export guidance_embed=True") as e:
            export()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_dit_pipeline_segments_carry_the_guidance():
    model = _perturb(_dit("class", True), seed=4)
    assert cond_keys(model) == ("class_labels", "guidance")
    g = torch.Generator().manual_seed(5)
    x, t, cond = _x(model, 3, g), torch.rand(3, generator=g), _cond(model.config, 3, g)
    first, second = make_segment(copy.deepcopy(model), 0, 1), make_segment(copy.deepcopy(model), 1, 2)
    assert any(n.startswith("g_embed.") for n, _ in first.named_parameters())
    assert not any(n.startswith("g_embed.") for n, _ in second.named_parameters())
    with torch.no_grad():
        out = second(*first(x, t, *(cond[k] for k in cond_keys(model))))
        torch.testing.assert_close(out, model(x, t, cond), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ UNet
def _unet(flag, cond="text"):
    mcfg = ModelConfig(name="UNet-T", image_size=8, in_channels=4, cond=cond, num_classes=CLASSES,
                       args={"block_out_channels": [16, 32], "guidance_embed": flag})
    return registry.arch_config(mcfg, text_dim=TEXT_DIM)


def test_unet_starts_as_the_model_without_the_flag():
    (arch, pcfg), (_, gcfg) = _unet(False), _unet(True)
    plain, guided = _build(arch, pcfg), _build(arch, gcfg)
    proj = guided.inner.time_embedding.cond_proj
    assert proj.weight.shape == (16, GUIDANCE_EMBED_DIM) and torch.equal(proj.weight, torch.zeros_like(proj.weight))
    extra = set(guided.state_dict()) - set(plain.state_dict())
    assert extra == {"inner.time_embedding.cond_proj.weight"}
    assert all(torch.equal(v, guided.state_dict()[k]) for k, v in plain.state_dict().items())
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), _cond(gcfg, 2, g)
    with torch.no_grad():
        assert torch.equal(guided(x, t, cond), plain(x, t, cond))
    del cond["guidance"]
    with pytest.raises(ValueError, match=r"cond\['guidance'\] is required"):
        guided(x, t, cond)


def test_unet_flag_needs_the_text_form():
    with pytest.raises(ConfigError, match="model.args.guidance_embed.*text form"):
        _unet(True, cond="class")


def test_guidance_scale_embedding_is_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 2.0, 7.5, 14.0])
    for dim in (GUIDANCE_EMBED_DIM, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), ref)


def test_unet_export_keeps_time_cond_proj_dim(tmp_path):
    import diffusers
    from diffusers import LatentConsistencyModelPipeline

    arch, cfg = _unet(True)
    model = _perturb(_build(arch, cfg), only="inner.time_embedding.cond_proj")  # w now matters
    name = model.save_diffusers(model.state_dict(), tmp_path / "unet")
    ref = getattr(diffusers, name).from_pretrained(str(tmp_path / "unet"), local_files_only=True).eval()
    assert name == "UNet2DConditionModel" and ref.config.time_cond_proj_dim == GUIDANCE_EMBED_DIM
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), _cond(cfg, 2, g)
    # what diffusers' LCM pipelines pass for guidance_scale = w: the embedding of w - 1
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, cond["guidance"] - 1,
                                                                       embedding_dim=ref.config.time_cond_proj_dim)
    with torch.no_grad():
        ours = model(x, t, cond)
        theirs = ref(x, t * 1000, encoder_hidden_states=cond["text_states"], encoder_attention_mask=cond["text_mask"],
                     timestep_cond=w_emb).sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert not torch.allclose(ours, model(x, t, dict(cond, guidance=cond["guidance"] + 2.0)))
    assert UNet.state_from_diffusers(ref.state_dict()).keys() == model.state_dict().keys()
    # and back: init_from the exported folder
    assert model.load_diffusers(tmp_path / "unet").keys() == model.state_dict().keys()
