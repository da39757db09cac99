"""The video DiT on tiny configs: shapes, 3-D positions, factorized attention, the pretrain path on clips,
config round trips, sampling and the video grid. Tier 1: CPU, seconds."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difftrain.config import ConfigError, ModelConfig
from difftrain.config_checks import load_config
from difftrain.diffusion.diffusion import build_diffusion
from difftrain.models import registry
from difftrain.models.dit import sincos_pos_embed_2d
from difftrain.models.dit_video import VideoDiT, VideoDiTBlock, VideoDiTConfig, sincos_pos_embed_3d
from difftrain.models.encoders import PixelSpace
from difftrain.sampling import SampleGrid, generate, grid, sample_shape
from difftrain.train.build import Shared, build_backbone, model_config, read_model_config, write_model_config
from difftrain.models.conditioner import Conditioner
from difftrain.train.stages.pretrain import PretrainStage

TEXT_DIM, L = 12, 5


def tiny(**kw) -> VideoDiTConfig:
    args = dict(image_size=8, in_channels=3, num_classes=4, text_dim=0, patch_size=2, hidden_size=32, depth=2,
                num_heads=2, frames=4, temporal_patch=1, attention="full")
    return VideoDiTConfig(**dict(args, **kw))


def cond_for(cfg, B: int) -> dict:
    cond = {}
    if cfg.num_classes:
        cond["class_labels"] = torch.arange(B) % (cfg.num_classes + 1)
    if cfg.text_dim:
        cond["text_states"] = torch.randn(B, L, cfg.text_dim)
        cond["text_mask"] = torch.arange(L)[None].expand(B, L) < 3
    return cond


def perturbed(cfg, seed: int = 0) -> VideoDiT:
    """Materialised, then every weight perturbed (zero-init gates and projections would hide the mixing)."""
    model = registry.materialize(registry.build("dit_video", cfg), "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def video_cfg(*overrides: str):
    return load_config(None, ["model.name=DiT-T/2", "model.frames=4", "data.kind=video", "model.image_size=8", "model.in_channels=3",
                              "model.cond=class", "model.num_classes=3", "model.args.depth=1",
                              "model.args.hidden_size=32", "model.args.num_heads=2", "data.caption_dropout=0.0",
                              "diffusion.path=rf", "diffusion.target=velocity", *overrides])


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("pt", [1, 2])
@pytest.mark.parametrize("kind", ["class", "text"])
def test_shapes_backward_and_trunk_cut(attention, pt, kind):
    extra = dict(num_classes=0, text_dim=TEXT_DIM) if kind == "text" else {}
    cfg = tiny(attention=attention, temporal_patch=pt, **extra)
    model = perturbed(cfg)
    assert isinstance(model.blocks, torch.nn.ModuleList) and all(isinstance(b, VideoDiTBlock) for b in model.blocks)
    for T, H, W in [(4, 8, 8), (2 * pt, 8, 12)]:
        x, t, cond = torch.randn(2, T, 3, H, W), torch.rand(2), cond_for(cfg, 2)
        out = model(x, t, cond)
        assert out.shape == (2, T, 3, H, W) and torch.isfinite(out).all()
        h, c, mod, text, mask = model.embed(x, t, cond)  # the pipeline-cut protocol of the image DiT
        assert h.shape == (2, T // pt, (H // 2) * (W // 2), 32)
        for block in model.blocks:
            h = block(h, mod, text, mask)
        assert torch.equal(model.final(h, c, x.shape[-2:]), out)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2), cond)
    if pt == 2:
        with pytest.raises(ValueError, match="temporal_patch=2"):
            model(torch.randn(2, 3, 3, 8, 8), torch.rand(2), cond)


def test_unpatchify_puts_each_token_on_its_own_patch():
    model = perturbed(tiny(temporal_patch=2))
    x = torch.randn(1, 4, 3, 8, 12)
    h, c, *_ = model.embed(x, torch.rand(1), cond_for(model.config, 1))  # [1, 2, 4*6, D]
    h2 = h.clone()
    h2[0, 1, 1 * 6 + 2] += torch.randn(h.shape[-1])  # token of frames 2-3, patch row 1, patch column 2
    with torch.no_grad():
        changed = (model.final(h2, c, x.shape[-2:]) - model.final(h, c, x.shape[-2:]))[0].abs().amax(1) > 0
    expect = torch.zeros(4, 8, 12, dtype=torch.bool)
    expect[2:4, 2:4, 4:6] = True
    assert torch.equal(changed, expect)


def test_zero_output_at_init_and_temporal_proj_zero():
    model = registry.materialize(registry.build("dit_video", tiny(attention="factorized")), "cpu", seed=0)
    assert all(not b.temporal_attn.proj.weight.any() for b in model.blocks)
    out = model(torch.randn(1, 4, 3, 8, 8), torch.rand(1), cond_for(model.config, 1))
    assert not out.any()  # adaLN-Zero + zero final layer, as the image DiT


def test_pos_embed_follows_the_input_shape():
    D, base = 32, 4
    e4, e8 = (sincos_pos_embed_3d(D, T, 4, 6, base).view(T, 24, D) for T in (4, 8))
    assert torch.equal(e8[:4], e4)  # frames keep unit spacing: a longer clip extends the positions
    spatial = sincos_pos_embed_2d(D - D // 4, 4, 6, base)
    assert all(torch.equal(e8[f, :, D // 4:], spatial) for f in range(8))  # space: the image DiT's embedding
    assert (e8[0, :, :D // 4] != e8[1, :, :D // 4]).any()  # time channels tell frames apart
    assert torch.equal(e8[3, :, :D // 4], e8[3, :1, :D // 4].expand(24, -1))  # ... and only frames
    model = perturbed(tiny(frames=8))
    outs = [model(torch.randn(1, T, 3, 8, 8), torch.rand(1), cond_for(model.config, 1)) for T in (4, 8, 6)]
    assert [o.shape[1] for o in outs] == [4, 8, 6]
    x = torch.randn(1, 4, 3, 8, 8)  # swapping two frames is not an equivariance: the time embedding breaks it
    cond, t = cond_for(model.config, 1), torch.rand(1)
    assert not torch.allclose(model(x[:, [1, 0, 2, 3]], t, cond)[:, [1, 0, 2, 3]], model(x, t, cond), atol=1e-5)
    with pytest.raises(ConfigError, match="hidden_size"):
        tiny(hidden_size=24, num_heads=2)
    with pytest.raises(ConfigError, match="model.frames"):
        tiny(frames=3, temporal_patch=2)
    with pytest.raises(ConfigError, match="model.attention"):
        tiny(attention="axial")


def _block(attention: str) -> VideoDiTBlock:
    torch.manual_seed(0)
    block = VideoDiTBlock(32, 2, 4.0, "zero", cross=False, attention=attention)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def _change(block, x, mod, frame: int, pos: int) -> torch.Tensor:
    """|block(x') - block(x)| per (frame, position) [T, S] when token (frame, pos) of x is changed (by a random
    vector: LayerNorm would remove a constant shift)."""
    x2 = x.clone()
    x2[0, frame, pos] += torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (block(x2, mod) - block(x, mod))[0].abs().amax(-1)


def test_factorized_attention_is_factorized():
    T, S, A, B = 3, 6, 0, 4  # token A of frame 0; token B of frame 1
    g = torch.Generator().manual_seed(0)  # seeded: an unseeded draw made the thresholds below flaky
    x, mod = torch.randn(1, T, S, 32, generator=g), torch.randn(1, 32, generator=g)
    full, fact = _block("full"), _block("factorized")
    # 1) spatial attention stays within a frame: with the temporal branch off, frame 0 ignores frame 1
    with torch.no_grad():
        fact.temporal_attn.proj.weight.zero_()
        fact.temporal_attn.proj.bias.zero_()
    assert _change(fact, x, mod, frame=1, pos=B)[0].max() == 0
    assert _change(full, x, mod, frame=1, pos=B)[0, A] > 1e-4  # the same check fails for joint attention
    # 2) temporal attention stays at one location: with the spatial branch off, (1, B) reaches frame 0 only at B
    fact = _block("factorized")
    with torch.no_grad():
        fact.attn.proj.weight.zero_()
        fact.attn.proj.bias.zero_()
    d = _change(fact, x, mod, frame=1, pos=B)
    assert d[0, B] > 1e-4 and d[0, [s for s in range(S) if s != B]].max() == 0
    # 3) the attention calls see one frame (spatial) / one location (temporal) per sequence
    seen = {}

    def record(name):
        return lambda module, args, out: seen.__setitem__(name, args[0].shape)  # returns None: output unchanged

    fact.attn.register_forward_hook(record("spatial"))
    fact.temporal_attn.register_forward_hook(record("temporal"))
    full.attn.register_forward_hook(record("full"))
    with torch.no_grad():
        fact(torch.randn(2, T, S, 32), torch.randn(2, 32))
        full(torch.randn(2, T, S, 32), torch.randn(2, 32))
    assert seen == {"spatial": (2 * T, S, 32), "temporal": (2 * S, T, 32), "full": (2, T * S, 32)}


def test_activation_checkpointing_wraps_the_video_blocks():
    import copy

    from difftrain.parallelism.parallelize import apply_activation_checkpointing, trunk_blocks

    model = perturbed(tiny(attention="factorized", temporal_patch=2))
    ckpt = copy.deepcopy(model)
    apply_activation_checkpointing(ckpt)
    assert len(trunk_blocks(ckpt)) == 2
    x, t, cond = torch.randn(2, 4, 3, 8, 8), torch.rand(2), cond_for(model.config, 2)
    for m in (model, ckpt):
        m(x, t, cond).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_export_to_diffusers_is_refused(tmp_path):
    from difftrain.models.dit_export import ExportError

    model = perturbed(tiny())
    with pytest.raises(ExportError, match="video DiT"):
        model.save_diffusers(model.state_dict(), tmp_path)
    with pytest.raises(ExportError, match="video DiT"):
        model.load_diffusers(tmp_path)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_selects_the_video_form_and_round_trips(tmp_path):
    cfg = video_cfg("model.attention=factorized", "model.temporal_patch=2")
    arch, acfg = model_config(cfg, 0, 3)
    assert arch == "dit_video" and (acfg.frames, acfg.temporal_patch, acfg.attention) == (4, 2, "factorized")
    write_model_config(arch, acfg, tmp_path)
    assert read_model_config(tmp_path) == (arch, acfg)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["frames"] == 4
    model = perturbed(acfg).eval()
    registry.save_pretrained(model, model.state_dict(), tmp_path / "export")
    loaded = registry.load_pretrained(tmp_path / "export").eval()
    assert type(loaded) is VideoDiT and loaded.config == acfg
    x, t, cond = torch.randn(2, 4, 3, 8, 8), torch.rand(2), cond_for(acfg, 2)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))
    image_arch, _ = registry.arch_config(ModelConfig(name="DiT-T/2"))
    assert image_arch == "dit"
    with pytest.raises(ConfigError, match="model.frames.*no video form"):
        registry.arch_config(ModelConfig(name="UNet-T", frames=4))
    with pytest.raises(ConfigError, match="model.attention.*video models only"):
        registry.arch_config(ModelConfig(name="DiT-T/2", attention="factorized"))
    with pytest.raises(ConfigError, match="model.args.frames.*model.frames"):
        registry.arch_config(ModelConfig(name="DiT-T/2", frames=4, args={"frames": 8}))
    with pytest.raises(ConfigError, match="model.attention"):
        video_cfg("model.attention=axial")


# ------------------------------------------------------------------------------------------------ pretrain path
def _stage(cfg):
    arch, acfg = model_config(cfg, 0, 3)
    cpu = torch.device("cpu")
    stage = PretrainStage(Shared.parts(cfg, cpu, diffusion=build_diffusion(cfg.diffusion), vae=PixelSpace(3),
                                       conditioner=Conditioner(cfg.model, None, cpu), arch=arch, acfg=acfg))
    stage.bind({"backbone": build_backbone(arch, acfg, cpu, cfg.run.seed)})
    return stage


def test_pretrain_steps_reduce_the_loss_on_a_fixed_clip_batch():
    cfg = video_cfg("model.attention=factorized")
    stage = _stage(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"pixels": torch.rand(4, 4, 3, 8, 8, generator=g) * 2 - 1, "index": torch.arange(4),
             "labels": torch.tensor([0, 1, 2, 0])}
    frozen = stage.frozen(batch, step=0)
    prep = stage.prepare(frozen, step=0)  # the same noise and t every step: a fixed regression problem
    assert prep["eps"].shape == prep["x_t"].shape == (4, 4, 3, 8, 8)
    # keyed noise is per sample over the whole clip: the same whatever batch the sample arrives in
    sub = stage.prepare({**frozen, "x0": frozen["x0"][2:], "index": torch.arange(2, 4)}, step=0)
    assert torch.equal(sub["eps"], prep["eps"][2:]) and torch.equal(sub["t"], prep["t"][2:])
    # t [B] broadcasts over [B, T, C, H, W] sample by sample (path rf: x_t = (1 - t) x0 + t eps)
    d = stage.diffusion
    for i in range(4):
        ti = prep["t"][i]
        torch.testing.assert_close(prep["x_t"][i], (1 - ti) * prep["x0"][i] + ti * prep["eps"][i])
        torch.testing.assert_close(d.target(prep["x0"], prep["eps"], prep["t"])[i], prep["eps"][i] - prep["x0"][i])
    model = stage.live["backbone"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, per = stage.loss(stage.forward(prep), prep)
        assert per.shape == (4,)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    with pytest.raises(ConfigError, match="model.frames"):
        stage.frozen({**batch, "pixels": batch["pixels"][:, 0]}, step=0)  # image batches for a video model


def test_vae_codes_clips_frame_by_frame(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from difftrain.models.encoders import VAE

    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path)
    vae = VAE.from_pretrained(str(tmp_path))
    clip = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    z = vae.encode(clip)
    assert z.shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(z[1, 2], vae.encode(clip[1, 2:3])[0])
    out = vae.decode(z)
    assert out.shape == clip.shape
    torch.testing.assert_close(out[0, 1], vae.decode(z[0, 1:2])[0])
    assert PixelSpace(3).encode(clip) is clip


# ------------------------------------------------------------------------------------------------ sampling
def test_sampling_gives_clips_and_a_frame_grid(tmp_path):
    cfg = video_cfg("run.sample_every=1", "run.sample_num=3", "run.sample_steps=2", "run.sample_sampler=euler",
                    "run.sample_guidance=2.0", f"run.dir={tmp_path}")
    stage = _stage(cfg)
    acfg = stage.live["backbone"].config
    assert sample_shape(acfg) == (4, 3, 8, 8)
    perturbed_model = perturbed(acfg).eval()
    kw = dict(n=3, shape=sample_shape(acfg), steps=2, sampler="euler", guidance=2.0, seed=0,
              device=torch.device("cpu"), labels=torch.tensor([0, 1, 2]))
    videos = generate(perturbed_model, stage.diffusion, stage.conditioner, stage.vae, **kw)
    assert videos.shape == (3, 4, 8, 8, 3) and videos.dtype == np.uint8
    again = generate(perturbed_model, stage.diffusion, stage.conditioner, stage.vae, batch_size=2, **kw)
    assert np.array_equal(videos, again)  # keyed start noise: batching does not matter
    g = grid(videos)
    assert g.shape == (2 + 3 * 10, 2 + 4 * 10, 3)  # one row per clip, one column per frame, 2 px padding
    for i in range(3):
        for f in range(4):
            assert np.array_equal(g[2 + 10 * i:10 + 10 * i, 2 + 10 * f:10 + 10 * f], videos[i, f])
    with pytest.raises(ValueError, match="one column per frame"):
        grid(videos, nrow=3)
    images = videos[:, 0]
    assert grid(images).shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # images: the square grid, as before

    # the trainer callback writes the frame grid as PNG and to tensorboard
    logged = {}
    trainer = SimpleNamespace(
        cfg=cfg, acfg=acfg, diffusion=stage.diffusion, conditioner=stage.conditioner, vae=stage.vae,
        device=torch.device("cpu"), rank=0, run_dir=tmp_path,
        engine=SimpleNamespace(ema_swapped_in=contextlib.nullcontext), served_model=lambda: perturbed_model,
        sampling=lambda: PretrainStage.sampling(cfg),
        metrics=SimpleNamespace(add_image=lambda tag, img, step: logged.setdefault(tag, img)))
    SampleGrid().on_step_end(trainer, 1)
    assert (tmp_path / "samples" / "step_00000001.png").is_file()
    assert logged["samples/ema"].shape == g.shape


def test_image_model_sampling_shape_is_unchanged():
    arch, acfg = registry.arch_config(ModelConfig(name="DiT-T/2", image_size=8))
    assert sample_shape(acfg) == (3, 8, 8)
    assert not hasattr(acfg, "frames") and dataclasses.is_dataclass(acfg)
