"""The text UNet's ControlNet (finetune/controlnet_unet.py): diffusers' ``ControlNetModel`` built from the base UNet.
A fresh branch, scale 0 and no control image give the base exactly; only the branch trains; the control image
enters in pixels downsampled by the VAE factor; our threaded forward equals diffusers' own ``ControlNetModel`` +
``UNet2DConditionModel`` residual interface; the export is a ``ControlNetModel`` folder (no missing or unexpected
keys) that ``StableDiffusionControlNetPipeline`` serves with our outputs, and ``difftrain sample`` reads it back."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of
from tests.unit.test_controlnet import perturb
from tests.unit.test_lora import trained_base

diffusers = pytest.importorskip("diffusers")

UNET = ["model.name=UNet-T", "model.cond=text", "encoders.text=minilm", "model.image_size=8", "model.in_channels=4",
        "data.image_size=32", "data.channels=3", "data.control=edges", 'adapt=[{"kind":"controlnet"}]']  # a VAE factor of 4


def _unet(*extra: str):
    cfg = load_config(None, [*UNET, *extra])
    _, base = trained_base(cfg)
    changes = changes_of(cfg)
    model = apply_changes(copy.deepcopy(base), changes, seed=0).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"text_states": torch.randn(2, 5, 384, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    control = torch.rand(2, 3, 32, 32, generator=g)  # pixels in [0, 1], 4x the latent side
    return changes, base.eval(), model, (x, torch.rand(2, generator=g), cond), control


def _train(model) -> None:
    perturb(model.control)


def test_fresh_branch_scale_zero_and_no_control_are_the_base():
    changes, base, model, (x, t, cond), control = _unet()
    net = model.control.net
    assert isinstance(net, diffusers.ControlNetModel)
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32, 96)  # two halvings: factor 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("control.")}
    assert all(changes[0].owns(n) for n in trainable)
    for name, p in base.inner.down_blocks.state_dict().items():  # the encoder copy starts as the base's
        assert torch.equal(net.down_blocks.state_dict()[name], p), name
    with torch.no_grad():
        ref = base(x, t, cond)
        assert torch.equal(model(x, t, {**cond, "control": control}), ref)  # zero convolutions
        _train(model)
        assert torch.equal(model(x, t, cond), ref)
        assert torch.equal(model(x, t, {**cond, "control": control, "control_scale": 0.0}), ref)
        out = model(x, t, {**cond, "control": control})
        assert not torch.allclose(out, ref)
        assert not torch.allclose(out, model(x, t, {**cond, "control": torch.rand_like(control)}))


def test_equals_diffusers_controlnet_and_unet_residual_interface():
    """Independent: diffusers' ControlNetModel.forward gives the residuals, UNet2DConditionModel.forward adds them."""
    _, _, model, (x, t, cond), control = _unet()
    _train(model)
    with torch.no_grad():
        ours = model(x, t, {**cond, "control": control, "control_scale": 0.6})
        steps = t * 1000
        down, mid = model.control.net(x, steps, encoder_hidden_states=cond["text_states"], controlnet_cond=control,
                                      conditioning_scale=0.6, return_dict=False)
        theirs = model.inner(x, steps, encoder_hidden_states=cond["text_states"],
                             down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_caption_mask_reaches_the_branch():
    """A padded caption: the branch's cross-attention masks it as the base's does (diffusers' forward cannot)."""
    _, _, model, (x, t, cond), control = _unet()
    _train(model)
    masked = {**cond, "text_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)}
    noise = {**masked, "text_states": masked["text_states"].clone()}
    noise["text_states"][0, 2:] = torch.randn(3, 384)  # what the mask hides
    with torch.no_grad():
        a = model(x, t, {**masked, "control": control})
        b = model(x, t, {**noise, "control": control})
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_export_is_a_controlnet_model_folder_served_by_the_stock_pipeline(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difftrain.finetune.controlnet_export import load_controlnet
    from difftrain.finetune.served import save_served

    _, _, model, (x, t, cond), control = _unet()
    _train(model)
    cls_name, line = save_served(model, model.state_dict(), tmp_path)
    assert cls_name == "UNet2DConditionModel" and "ControlNetModel" in line
    net, info = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "controlnet"), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    for name, p in model.control.net.state_dict().items():
        assert torch.equal(net.state_dict()[name], p), name
    # the stock pipeline: one DDIM step from our latents, guidance off, captions as embeddings
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=384, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=1000))
    pytest.importorskip("tokenizers")
    vocab = tmp_path / "vocab.json"
    vocab.write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing", prediction_type="epsilon")
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer(str(vocab), str(tmp_path / "merges.txt")), unet=unet,
        controlnet=net.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    assert pipe.vae_scale_factor == 4
    with torch.no_grad():
        out = pipe(prompt_embeds=cond["text_states"], image=control, num_inference_steps=1, guidance_scale=1.0,
                   latents=x, output_type="latent", controlnet_conditioning_scale=0.6).images
        scheduler.set_timesteps(1)
        step = scheduler.timesteps[0]
        eps = model(x, step.float().expand(2) / 1000, {**cond, "control": control, "control_scale": 0.6})
        ref = scheduler.step(eps, step, x).prev_sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # our own reading of the export (difftrain sample EXPORT --control)
    from difftrain.models.unet import UNet

    served = UNet(model.config).eval()
    served.load_state_dict(served.load_diffusers(tmp_path), strict=True)
    assert load_controlnet(served, tmp_path, "cpu")
    with torch.no_grad():
        full = {**cond, "control": control}
        torch.testing.assert_close(served(x, t, full), model(x, t, full), rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["model.cond=class", "model.num_classes=10", "encoders.text=none"], "pairs with the text UNet"),
    (["model.args.guidance_embed=true"], "has no guidance input"),
    (['adapt=[{"kind":"controlnet","layers":2}]'], "'adapt[0].layers' = 2"),
    (["data.image_size=24"], "must be 1, 2, 4 or 8, got 3"),
])
def test_bad_entries_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match="^config key ") as e:
        _unet(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
