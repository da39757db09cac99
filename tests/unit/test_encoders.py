"""Frozen encoders: the packaged MiniLM, tiny CLIP / T5 folders, a tiny AutoencoderKL, pixel space."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from difftrain.models.encoders import VAE, PixelSpace, TextEncoder, build_vae

MAX_LEN = 12
CAPTIONS = ["a cat", "a photo of a red dog"]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_pretrained("minilm", max_length=MAX_LEN)


def test_minilm_encode(minilm):
    assert minilm.dim == 384 and not minilm.training
    assert not any(p.requires_grad for p in minilm.parameters())
    states, mask = minilm.encode(CAPTIONS, "cpu")
    assert states.shape == (2, MAX_LEN, 384) and states.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == (2, MAX_LEN)
    n_tokens = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS]  # [CLS] ... [SEP]
    assert mask.sum(1).tolist() == n_tokens
    assert all(mask[i, :n].all() and not mask[i, n:].any() for i, n in enumerate(n_tokens))
    assert not torch.allclose(states[0, :2], states[1, :2])
    again, _ = minilm.encode(CAPTIONS, "cpu")
    assert torch.equal(states, again)
    minilm.train()  # frozen modules stay in eval mode
    assert not minilm.training and not minilm.model.training


def test_minilm_null_states(minilm):
    null, null_mask = minilm.null_states(3, "cpu")
    empty, empty_mask = minilm.encode([""], "cpu")
    assert null.shape == (3, MAX_LEN, 384) and null_mask.shape == (3, MAX_LEN)
    assert torch.equal(null[2], empty[0]) and torch.equal(null_mask[1], empty_mask[0])
    assert minilm.null_states(1, "cpu")[0].data_ptr() == null.data_ptr()  # cached


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "a", "cat", "dog", "photo", "of", "red"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_model(kind: str):
    import transformers as tf

    if kind == "clip":
        return tf.CLIPTextModel(tf.CLIPTextConfig(
            vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=MAX_LEN, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    return tf.T5EncoderModel(tf.T5Config(vocab_size=10, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))


@pytest.mark.parametrize("kind, cls_name", [("clip", "CLIPTextModel"), ("t5", "T5EncoderModel")])
def test_clip_and_t5_folders(tmp_path, kind, cls_name):
    torch.manual_seed(0)
    ref = _tiny_model(kind).eval()
    ref.save_pretrained(tmp_path / kind)
    _tiny_tokenizer().save_pretrained(tmp_path / kind)

    enc = TextEncoder.from_pretrained(str(tmp_path / kind), max_length=MAX_LEN)
    assert type(enc.model).__name__ == cls_name and enc.dim == 16
    states, mask = enc.encode(CAPTIONS, "cpu")
    assert states.shape == (2, MAX_LEN, 16) and mask.sum(1).tolist() == [2, 6]
    ids = torch.tensor([[4, 5] + [0] * (MAX_LEN - 2)])
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state
    torch.testing.assert_close(states[:1], expect, atol=1e-6, rtol=0)
    null, _ = enc.null_states(2, "cpu")
    assert null.shape == (2, MAX_LEN, 16) and torch.isfinite(null).all()


def test_pipeline_folder_layout(tmp_path):
    _tiny_model("clip").save_pretrained(tmp_path / "text_encoder")
    _tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    enc = TextEncoder.from_pretrained(str(tmp_path), max_length=MAX_LEN)
    assert type(enc.model).__name__ == "CLIPTextModel"
    with pytest.raises(FileNotFoundError, match="minilm"):
        TextEncoder.from_pretrained(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.5, shift_factor=0.25)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_vae_scaling_and_shapes(vae_dir):
    vae = build_vae(str(vae_dir))
    assert isinstance(vae, VAE) and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.latent_channels == 4 and vae.downsample_factor == 2
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.25)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = vae.encode(pixels)
    assert lat.shape == (2, 4, 8, 8) and not lat.requires_grad
    with torch.no_grad():
        mean = vae.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(lat, (mean - 0.25) * 0.5)
    s1 = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, lat)
    out = vae.decode(lat)
    assert out.shape == pixels.shape
    with torch.no_grad():
        torch.testing.assert_close(out, vae.vae.decode(mean).sample)  # decode undoes the scaling


def test_vae_without_shift_factor(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8).save_pretrained(tmp_path)
    vae = VAE.from_pretrained(str(tmp_path))
    assert vae.shift_factor == 0.0 and vae.scaling_factor == pytest.approx(0.18215)
    assert vae.downsample_factor == 1


def test_pixel_space_is_identity():
    space = build_vae("", channels=1)
    assert isinstance(space, PixelSpace) and space.latent_channels == 1 and space.downsample_factor == 1
    x = torch.randn(2, 1, 8, 8)
    assert space.encode(x) is x and space.decode(x) is x


def test_caption_cache_is_exact_and_bounded():
    from difftrain.models.encoders import TextEncoder

    cached = TextEncoder.from_pretrained("minilm", max_length=8, cache_size=2)
    caps = ["a handwritten digit 1", "a handwritten digit 2", "a handwritten digit 1", ""]
    states, mask = cached.encode(caps)
    assert len(cached._cache) == 2  # LRU bound
    for i, c in enumerate(caps):
        s1, m1 = cached.encode([c])  # served from the cache or encoded alone: same bits
        ref_s, ref_m = cached._encode([c], cached.device)
        assert torch.equal(states[i], ref_s[0]) and torch.equal(mask[i], ref_m[0])
        assert torch.equal(s1[0], ref_s[0])
    batched, _ = cached._encode(caps, cached.device)
    assert torch.allclose(states, batched, atol=1e-5)  # and equal to batched encoding up to rounding
