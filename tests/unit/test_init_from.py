"""One diffusers interface for every architecture (``save_diffusers`` / ``load_diffusers``) and ``init_from``."""
from __future__ import annotations

import json

import pytest
import torch

from difftrain.config import ConfigError, ModelConfig
from difftrain.models import registry
from difftrain.models.dit import DiTConfig
from difftrain.train.build import load_weights_only

pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


def dit_config(**kw) -> DiTConfig:
    args = dict(image_size=8, in_channels=4, num_classes=0, text_dim=0, patch_size=2, hidden_size=32, depth=2,
                num_heads=2)
    return DiTConfig(**dict(args, **kw))


def unet_config(cond: str, image_size: int = 8):
    mcfg = ModelConfig(name="UNet-T", image_size=image_size, in_channels=4, cond=cond, num_classes=10,
                       args={"block_out_channels": [16, 32]})
    return registry.arch_config(mcfg, text_dim=16)[1]


CONFIGS = {
    "dit-class": lambda **kw: ("dit", dit_config(num_classes=5, out_channels=8, **kw)),
    "dit-text": lambda **kw: ("dit", dit_config(text_dim=12, hidden_size=64, num_heads=4, **kw)),
    "unet-class": lambda **kw: ("unet", unet_config("class", **kw)),
    "unet-text": lambda **kw: ("unet", unet_config("text", **kw)),
}


def model(kind: str, seed: int, **kw):
    """Materialised, then every weight perturbed (zero-init parts would make equality checks trivial)."""
    arch, cfg = CONFIGS[kind](**kw)
    m = registry.materialize(registry.build(arch, cfg), "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_then_load_diffusers_is_exact(kind, tmp_path):
    src, other = model(kind, 1), model(kind, 2)
    name = other.save_diffusers(src.state_dict(), tmp_path)  # written through another object, as EMA export is
    assert isinstance(name, str) and (tmp_path / WEIGHTS).is_file()
    assert_same_state(other.load_diffusers(tmp_path), src.state_dict())


@pytest.mark.parametrize("kind", ["dit-class", "unet-text"])
def test_load_weights_only_from_both_formats(kind, tmp_path):
    src = model(kind, 1)
    registry.save_pretrained(src, src.state_dict(), tmp_path / "ours")
    src.save_diffusers(src.state_dict(), tmp_path / "diffusers")
    for folder in ("ours", "diffusers"):
        dst = model(kind, 2)
        load_weights_only(dst, str(tmp_path / folder))
        assert_same_state(dst.state_dict(), src.state_dict())


@pytest.mark.parametrize("kind", ["dit-text", "unet-class"])
def test_init_from_may_change_the_resolution(kind, tmp_path):
    src = model(kind, 1)
    src.save_diffusers(src.state_dict(), tmp_path)
    dst = model(kind, 2, image_size=16)
    load_weights_only(dst, str(tmp_path))
    assert_same_state(dst.state_dict(), src.state_dict())


def test_sharded_folder_and_legacy_class_name(tmp_path):
    src = model("dit-class", 1)
    src.save_diffusers(src.state_dict(), tmp_path)
    state = load_file(str(tmp_path / WEIGHTS))
    (tmp_path / WEIGHTS).unlink()
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["_class_name"] = "Transformer2DModel"  # as folders written before diffusers 0.28 say
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert_same_state(src.load_diffusers(tmp_path), src.state_dict())


@pytest.mark.parametrize("kind,change,key", [
    ("dit-class", dict(hidden_size=64), "attention_head_dim"),
    ("dit-class", dict(depth=3), "num_layers"),
    ("dit-class", dict(num_classes=7), "num_embeds_ada_norm"),
    ("dit-text", dict(text_dim=8), "caption_channels"),
    ("unet-class", dict(layers_per_block=2), "layers_per_block"),
    ("unet-text", dict(text_dim=8), "cross_attention_dim"),
])
def test_architecture_mismatch_names_the_key(kind, change, key, tmp_path):
    src = model(kind, 1)
    src.save_diffusers(src.state_dict(), tmp_path)
    arch, cfg = CONFIGS[kind]()
    dst = registry.materialize(registry.build(arch, type(cfg)(**{**cfg.__dict__, **change})), "cpu", seed=0)
    with pytest.raises(ValueError, match=key) as err:
        dst.load_diffusers(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"init_from.*{key}"):
        load_weights_only(dst, str(tmp_path))


def test_wrong_class_and_wrong_arch_are_clear(tmp_path):
    dit, unet = model("dit-class", 1), model("unet-class", 1)
    dit.save_diffusers(dit.state_dict(), tmp_path / "dit")
    with pytest.raises(ValueError, match="_class_name = 'DiTTransformer2DModel', but the model is a UNet2DModel"):
        unet.load_diffusers(tmp_path / "dit")
    with pytest.raises(ValueError, match="_class_name"):
        model("dit-text", 1).load_diffusers(tmp_path / "dit")
    registry.save_pretrained(dit, dit.state_dict(), tmp_path / "ours")
    with pytest.raises(ConfigError, match="'dit' model, but the run builds a UNet"):
        load_weights_only(unet, str(tmp_path / "ours"))
    wide = registry.materialize(registry.build("dit", dit_config(num_classes=5, out_channels=8, hidden_size=64)),
                                "cpu", seed=0)
    with pytest.raises(ConfigError, match=r"'patch_embed.weight' has shape \(32, 4, 2, 2\)"):
        load_weights_only(wide, str(tmp_path / "ours"))


def test_embedder_copies_must_agree(tmp_path):
    src = model("dit-class", 1)
    src.save_diffusers(src.state_dict(), tmp_path)
    state = load_file(str(tmp_path / WEIGHTS))
    state["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"] += 1.0
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight.*differ"):
        src.load_diffusers(tmp_path)


@pytest.mark.parametrize("kind", ["dit-class", "unet-class"])
def test_pickle_bin_is_refused(kind, tmp_path):
    src = model(kind, 1)
    src.save_diffusers(src.state_dict(), tmp_path)
    (tmp_path / WEIGHTS).rename(tmp_path / "diffusion_pytorch_model.bin")  # never opened, so content is moot
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin' is a pickle checkpoint") as err:
        src.load_diffusers(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="init_from.*diffusion_pytorch_model.bin"):
        load_weights_only(src, str(tmp_path))
