"""Export of our DiT to diffusers: loads with from_pretrained and gives our outputs; refusals name the option."""
from __future__ import annotations

import json

import pytest
import torch

from difftrain.models import registry
from difftrain.models.dit import DiTConfig, sincos_pos_embed_2d, timestep_features
from difftrain.models.dit_export import ExportError, diffusers_target, export_dit_diffusers

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def tiny(**kw) -> DiTConfig:
    args = dict(image_size=8, in_channels=4, num_classes=0, text_dim=0, patch_size=2, hidden_size=32, depth=2,
                num_heads=2)
    return DiTConfig(**dict(args, **kw))


def random_model(cfg: DiTConfig, seed: int):
    """Materialised, then every weight perturbed: zero-init would make the comparison trivial."""
    model = registry.materialize(registry.build("dit", cfg), "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def export_and_load(cfg: DiTConfig, out):
    """Export the weights of one random model through a *different* model object, as a trainer exports EMA."""
    ours = random_model(cfg, seed=1)
    other = random_model(cfg, seed=2)
    name = export_dit_diffusers(other, ours.state_dict(), out)
    return ours, name, getattr(diffusers, name).from_pretrained(out).eval()


def test_class_conditional_matches_dit_transformer(tmp_path):
    cfg = tiny(num_classes=5, out_channels=8)  # learned-sigma layout: 2 * in_channels
    ours, name, ref = export_and_load(cfg, tmp_path)
    assert name == "DiTTransformer2DModel"
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 5, 3, 5])  # 5 = the null label
    for size in (8, 12):  # native size and another square size (diffusers' DiT unpatchify is square-only)
        x = torch.randn(4, 4, size, size, generator=g)
        t = torch.rand(4, generator=g)
        with torch.no_grad():
            a = ours(x, t, {"class_labels": labels})
            b = ref(x, timestep=t * 1000, class_labels=labels).sample
        assert a.shape == b.shape == (4, 8, size, size)
        assert (a - b).abs().max().item() <= TOL
        assert a.abs().max().item() > 0.1  # not a trivially zero comparison


def test_text_conditional_matches_pixart_transformer(tmp_path):
    cfg = tiny(text_dim=12, hidden_size=64, num_heads=4)
    ours, name, ref = export_and_load(cfg, tmp_path)
    assert name == "PixArtTransformer2DModel"
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 7, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for H, W in [(8, 8), (8, 12), (16, 24)]:  # native, and aspect buckets off the native grid
        x = torch.randn(3, 4, H, W, generator=g)
        t = torch.rand(3, generator=g)
        with torch.no_grad():
            a = ours(x, t, {"text_states": states, "text_mask": mask})
            b = ref(x, encoder_hidden_states=states, timestep=t * 1000, encoder_attention_mask=mask).sample
        assert a.shape == b.shape == (3, 4, H, W)
        assert (a[:2] - b[:2]).abs().max().item() <= TOL
        # a caption with no real token: both attend to every position, but diffusers adds its -10000 bias in
        # float32, which rounds the scores to ~1e-3, so only that looser agreement is possible
        assert (a[2] - b[2]).abs().max().item() <= 1e-3
        assert a.abs().max().item() > 0.1


def test_pixart_interpolation_scale_matches(tmp_path):
    cfg = tiny(text_dim=12, pos_interp_scale=2.0)
    ours, _, ref = export_and_load(cfg, tmp_path)
    x, t = torch.randn(2, 4, 8, 12), torch.rand(2)
    states, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        a = ours(x, t, {"text_states": states, "text_mask": mask})
        b = ref(x, encoder_hidden_states=states, timestep=t * 1000, encoder_attention_mask=mask).sample
    assert (a - b).abs().max().item() <= TOL


def test_folder_is_what_diffusers_writes(tmp_path):
    cfg = tiny(text_dim=12)
    export_dit_diffusers(random_model(cfg, 0), random_model(cfg, 0).state_dict(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["_class_name"] == "PixArtTransformer2DModel"
    assert conf["use_additional_conditions"] is False and conf["interpolation_scale"] == 1
    assert conf["caption_channels"] == 12 and conf["sample_size"] == 8 and conf["norm_eps"] == 1e-6


@pytest.mark.parametrize("kw,option", [
    (dict(num_classes=5, text_dim=12), "num_classes"),
    (dict(), "unconditional"),
    (dict(num_classes=5, modulation="single"), "modulation"),
    (dict(text_dim=12, modulation="zero"), "modulation"),
    (dict(num_classes=5, mlp_ratio=2.0), "mlp_ratio"),
    (dict(num_classes=5, pos_interp_scale=2.0), "pos_interp_scale"),
])
def test_refusals_name_the_option(kw, option, tmp_path):
    cfg = tiny(**kw)
    with pytest.raises(ExportError, match=option):
        diffusers_target(cfg)
    model = random_model(cfg, 0)
    with pytest.raises(ExportError, match=option):
        export_dit_diffusers(model, model.state_dict(), tmp_path)
    assert not any(tmp_path.iterdir())
    assert issubclass(ExportError, ValueError)


def test_state_must_match_model(tmp_path):
    model = random_model(tiny(num_classes=5), 0)
    state = dict(model.state_dict())
    state.pop("final_layer.linear.bias")
    with pytest.raises(ExportError, match="final_layer.linear.bias"):
        export_dit_diffusers(model, state, tmp_path)


def test_timestep_features_match_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.rand(16) * 1000
    for shift in (0, 1):
        ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
        assert torch.equal(timestep_features(t, 256, shift), ref)


def test_pos_embed_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for (gh, gw), base, interp in [((4, 4), 4, 1.0), ((6, 6), 4, 1.0), ((4, 6), 4, 1.0), ((8, 12), 16, 2.0)]:
        ref = get_2d_sincos_pos_embed(64, (gh, gw), base_size=base, interpolation_scale=interp).float()
        assert torch.equal(sincos_pos_embed_2d(64, gh, gw, base, interp), ref)
