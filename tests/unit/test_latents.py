"""Pre-encoding (data/encode.py) and latent shards (data/latents.py): layout, reading back through the
loader, training losses equal to the online path, the VAE posterior, config checks, kill and restart."""
import json
import shutil
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.data.images import to_unit
from difftrain.data.decode import SkipSample
from difftrain.data.encode import encode, with_field
from difftrain.data.latents import load_latent_data, output_name, shard_name, sibling
from difftrain.data.loader import ShardLoader
from difftrain.data.samples import SampleDecoder
from difftrain.diffusion.diffusion import build_diffusion
from difftrain.diffusion.keyed import keyed_randn
from difftrain.train.build import Shared, build_backbone, build_encoders, model_config
from difftrain.models.conditioner import Conditioner
from difftrain.train.stages.pretrain import PretrainStage
from tests.conftest import REPO, run_cmd, tiny_vae

CPU = torch.device("cpu")
SHARDS = "{00000..00002}.tar"  # 3 x 256 digits


def latent_data(cfg, text=None, vae=None):
    """``load_latent_data`` with the sections of a run config."""
    return load_latent_data(cfg.data, cfg.encoders, cfg.model.cond, text, vae)


def config(src: str, *extra: str):
    return load_config(REPO / "configs/demo.yaml", [
        f"data.train={src}", "data.image_size=16", "data.channels=1", "data.num_workers=0", "data.batch_size=16",
        "run.progress=false", *extra])


def source(digits) -> str:
    return digits["train"].rsplit("/", 1)[0] + "/" + SHARDS


def members(path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, in tar order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def encoders(digits):
    return build_encoders(config(source(digits)), CPU)  # (MiniLM, pixel space)


@pytest.fixture(scope="module")
def latent32(digits, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent32")
    encode(config(source(digits)), out, *encoders, dtype="float32", progress=False)
    return out


def test_names_and_json_splice():
    urls = {"/d/00001.tar": "/d/x.json", "file:/d/00001.tar": "file:/d/x.json",
            "https://h/d/00001.tar?v=1": "https://h/d/x.json?v=1",
            "pipe:aws s3 cp s3://b/d/00001.tar -": "pipe:aws s3 cp s3://b/d/x.json -"}
    for url, info in urls.items():
        assert shard_name(url) == "00001.tar" and sibling(url, "x.json") == info
    assert output_name("/d/00007.tar.gz") == "00007.tar" and output_name("/d/x.tgz") == "x.tar"
    src = b'{"a": 1,\n "b": [2]}\n'
    out = with_field(src, "difftrain", {"x": 1})
    assert out.startswith(src[:-2]) and json.loads(out) == {"a": 1, "b": [2], "difftrain": {"x": 1}}
    assert json.loads(with_field(b"{}", "difftrain", {})) == {"difftrain": {}}
    assert json.loads(with_field(None, "difftrain", {"x": 1})) == {"difftrain": {"x": 1}}


def test_layout(digits, encoders, tmp_path):
    text, vae = encoders
    cfg = config(source(digits))
    res = encode(cfg, tmp_path, text, vae, progress=False)  # float16
    names = [f"{i:05d}" for i in range(3)]
    assert set(files(tmp_path)) == {"encode_info.json", "null.safetensors",
                                    *(f"{n}.tar" for n in names), *(f"{n}_stats.json" for n in names)}
    assert res["done"] == 3 and res["written"] == 768 and res["skipped"] == {} and res["failed"] == []
    info = json.loads((tmp_path / "encode_info.json").read_text())
    assert info["encoders"] == {"text": "minilm", "text_max_length": 12, "vae": "", "channels": 1}
    assert info["latent"]["space"] == "pixels" and not info["latent"]["std"] and info["text"]["dim"] == 384
    assert info["source"]["buckets"] == [[16, 16]] and info["shards"] == [f"{n}.tar" for n in names]
    null = load((tmp_path / "null.safetensors").read_bytes())
    ns, nm = text.null_states(1)
    assert null["text_states"].dtype == torch.float32 and torch.equal(null["text_states"], ns[0])
    assert torch.equal(null["text_mask"].bool(), nm[0])
    decoder = SampleDecoder("image", 1, [(16, 16)])
    for n in names:
        src, out = members(f"{digits['train'].rsplit('/', 1)[0]}/{n}.tar"), members(tmp_path / f"{n}.tar")
        assert list(out) == list(src)  # same keys, same order
        stats = json.loads((tmp_path / f"{n}_stats.json").read_text())
        assert (stats["samples"], stats["written"], stats["error"]) == (256, 256, None)
    key = next(iter(out))
    sample = out[key]
    assert set(sample) == {"safetensors", "txt", "json"} and sample["txt"] == src[key]["txt"]
    meta = json.loads(sample["json"])
    stamp = meta.pop("difftrain")
    assert meta == json.loads(src[key]["json"])
    assert stamp["latent_shape"] == [1, 16, 16] and stamp["size"] == [16, 16] and stamp["dtype"] == "float16"
    assert stamp["fingerprints"] == info["fingerprints"]
    t = load(sample["safetensors"])
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
        "latent_mean": ((1, 16, 16), torch.float16), "text_states": ((12, 384), torch.float16),
        "text_mask": ((12,), torch.uint8)}
    pixels = to_unit(decoder({"__key__": key, **src[key]}, lambda _: 0.5)["pixels"])
    assert torch.equal(t["latent_mean"], pixels.half())
    states, mask = text.encode([sample["txt"].decode()])
    assert torch.equal(t["text_states"], states[0].half()) and torch.equal(t["text_mask"].bool(), mask[0])


def test_latent_loader_gives_online_text_states(digits, encoders, latent32):
    text, _ = encoders
    online = ShardLoader.from_config(config(source(digits)).data, 0, 1, 0)
    cfg = config(f"{latent32}/{SHARDS}", "data.kind=latent")
    latent = ShardLoader.from_config(cfg.data, 0, 1, 0)
    for _, a, b in zip(range(3), online, latent):
        assert a["keys"] == b["keys"] and torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
        assert "pixels" not in b and "latent_std" not in b
        assert torch.equal(b["latent_mean"], to_unit(a["pixels"]))
        states, mask = text.encode(a["captions"])
        assert torch.equal(b["text_states"], states) and torch.equal(b["text_mask"].bool(), mask)


class _NoVAE(torch.nn.Module):
    def encode(self, *_):
        raise AssertionError("the VAE must not run on pre-encoded batches")


@pytest.mark.parametrize("assign", ["none", "linear", "knn"])
def test_latent_losses_equal_online(digits, encoders, latent32, assign):
    """Pre-encoded latents train exactly as online encoding, with immiscible noise assignment too (it sees the
    same x0 on both paths, and permutes only the noise)."""
    text, vae = encoders
    extra = ("data.caption_dropout=0.5", "model.args.depth=2", f"diffusion.assign={assign}")
    cfg = config(source(digits), *extra)
    lcfg = config(f"{latent32}/{SHARDS}", "data.kind=latent", *extra)
    data = latent_data(lcfg)  # no encoders: the null condition comes from null.safetensors
    assert data.text_dim == text.dim and data.latent_channels == 1
    arch, acfg = model_config(cfg, text.dim, 1)
    model = build_backbone(arch, acfg, CPU, cfg.run.seed)
    diffusion = build_diffusion(cfg.diffusion)
    online = PretrainStage(Shared.parts(cfg, CPU, diffusion=diffusion, conditioner=Conditioner(cfg.model, text, CPU),
                                        vae=vae))
    latent_cond = Conditioner(lcfg.model, None, CPU, null_text=data.null_text)
    latent = PretrainStage(Shared.parts(lcfg, CPU, diffusion=diffusion, conditioner=latent_cond, vae=_NoVAE()))
    for stage in (online, latent):
        stage.bind({"backbone": model})
    loaders = ShardLoader.from_config(cfg.data, 0, 1, 0), ShardLoader.from_config(lcfg.data, 0, 1, 0)
    dropped = 0
    for step, a, b in zip(range(3), *loaders):
        losses = []
        for stage, batch in ((online, a), (latent, b)):
            prep = stage.prepare(stage.frozen(batch, step), step)
            with torch.no_grad():
                losses.append(stage.loss(stage.forward(prep), prep)[1])
        assert torch.equal(losses[0], losses[1])
        if assign == "linear":  # the noise rows were permuted, the data were not
            plain = keyed_randn(lcfg.run.seed, step, b["index"], prep["x0"].shape[1:], "noise")
            assert not torch.equal(prep["eps"], plain)
            assert torch.equal(prep["eps"].flatten(1).sort(0).values, plain.flatten(1).sort(0).values)
        null = online.conditioner.null(1)["text_states"][0]
        dropped += int((prep["cond"]["text_states"] == null).all(-1).all(-1).sum())
    assert dropped > 0  # caption dropout happened, and gave the same null condition on both paths


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    return [tiny_vae(tmp_path_factory.mktemp(f"vae{seed}"), seed) for seed in (0, 1)]


def test_vae_posterior_and_encoder_checks(digits, vae_dirs, tmp_path):
    src = digits["train"].rsplit("/", 1)[0] + "/{00000..00000}.tar"
    cls = ("model.cond=class", "model.num_classes=10", "encoders.text=", "model.in_channels=4", "model.image_size=8")
    cfg = config(src, f"encoders.vae={vae_dirs[0]}", *cls)
    text, vae = build_encoders(cfg, CPU)
    out = tmp_path / "lat"
    encode(cfg, out, text, vae, dtype="float32", batch_size=32, progress=False)
    assert not (out / "null.safetensors").exists()
    info = json.loads((out / "encode_info.json").read_text())
    assert info["latent"] == {"space": "vae", "channels": 4, "downsample_factor": 2, "scaling_factor": 0.5,
                              "shift_factor": 0.25, "std": True, "dtype": "float32"} and info["text"] is None
    src_samples = members(src.replace("{00000..00000}", "00000"))
    keys = list(src_samples)[:4]
    decoder = SampleDecoder("image", 1, [(16, 16)])
    pixels = to_unit(torch.stack([decoder({"__key__": k, **src_samples[k]}, lambda _: 0.5)["pixels"] for k in keys]))
    with torch.no_grad():
        dist = vae.vae.encode(pixels).latent_dist
    got = members(out / "00000.tar")
    for i, k in enumerate(keys):
        t = load(got[k]["safetensors"])
        assert set(t) == {"latent_mean", "latent_std"}
        torch.testing.assert_close(t["latent_mean"], (dist.mean[i] - 0.25) * 0.5)  # batch of 32 vs 4: rounding
        torch.testing.assert_close(t["latent_std"], dist.std[i] * 0.5)

    lcfg = config(f"{out}/00000.tar", "data.kind=latent", f"encoders.vae={vae_dirs[0]}", *cls)
    data = latent_data(lcfg, text, vae)
    assert data.null_text is None and data.latent_channels == 4
    batch = next(iter(ShardLoader.from_config(lcfg.data, 0, 1, 0)))
    assert batch["latent_std"].shape == batch["latent_mean"].shape == (16, 4, 8, 8)
    stage = PretrainStage(Shared.parts(lcfg, CPU, conditioner=Conditioner(lcfg.model, None, CPU), vae=_NoVAE()))
    z0, z0_again, z1 = (stage.frozen(batch, s)["x0"] for s in (0, 0, 1))
    assert torch.equal(z0, z0_again) and not torch.equal(z0, z1)  # keyed by step and sample
    xi = (z0 - batch["latent_mean"]) / batch["latent_std"]
    assert abs(xi.mean()) < 0.1 and abs(xi.std() - 1) < 0.1

    moved = tmp_path / "moved_vae"
    shutil.copytree(vae_dirs[0], moved)
    mcfg = config(f"{out}/00000.tar", "data.kind=latent", f"encoders.vae={moved}", *cls)
    latent_data(mcfg, text, build_encoders(mcfg, CPU)[1])  # same weights elsewhere: accepted
    with pytest.raises(ConfigError, match=r"data\.train.*encoders\.vae"):
        latent_data(mcfg)  # no modules to compare: the path decides
    ocfg = config(f"{out}/00000.tar", "data.kind=latent", f"encoders.vae={vae_dirs[1]}", *cls)
    with pytest.raises(ConfigError, match=r"data\.train.*encoders\.vae"):
        latent_data(ocfg, None, build_encoders(ocfg, CPU)[1])
    with pytest.raises(ConfigError, match=r"data\.train.*image_size"):
        latent_data(config(f"{out}/00000.tar", "data.kind=latent", "data.image_size=32",
                           f"encoders.vae={vae_dirs[0]}", *cls))


def test_text_mismatch_and_bad_latents(latent32, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train.*encoders\.text_max_length"):
        latent_data(config(f"{latent32}/{SHARDS}", "data.kind=latent", "encoders.text_max_length=8"))
    good = next(iter(members(latent32 / "00000.tar").items()))[1]
    decoder = SampleDecoder("latent", 1, [(16, 16)])
    assert set(decoder({"__key__": "k", **good}, None)) >= {"latent_mean", "text_states", "text_mask", "caption"}
    for broken in ({**good, "safetensors": b"\x08garbage"}, {k: v for k, v in good.items() if k != "safetensors"}):
        with pytest.raises(SkipSample) as e:
            decoder({"__key__": "k", **broken}, None)
        assert e.value.reason == "bad_latent"


def test_killed_encode_restarts_bit_identical(digits, tmp_path):
    args = [f"data.train={source(digits)}", "data.image_size=16", "data.channels=1", "run.progress=false",
            "model.cond=class", "model.num_classes=10", "encoders.text="]
    cfg = config(source(digits), *args[4:])
    ref = tmp_path / "ref"
    encode(cfg, ref, *build_encoders(cfg, CPU), progress=False)
    out = tmp_path / "killed"
    p = run_cmd([sys.executable, "-m", "difftrain", "data", "encode", "configs/demo.yaml", "--out", str(out), *args],
                env={"DIFFTRAIN_FAULT": "kill_after_shard:1:0"}, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "00000.tar").is_file() and not (out / "00001.tar").exists()
    (out / "00001.tar.tmp").write_bytes(b"half a shard from a killed run")
    res = encode(cfg, out, *build_encoders(cfg, CPU), progress=False)
    assert res["skipped_existing"] == 1 and res["done"] == 3
    assert files(out) == files(ref)
    with pytest.raises(ConfigError, match="another encoding"):
        encode(cfg, out, *build_encoders(cfg, CPU), dtype="float32", progress=False)


def test_video_is_encoded_frame_by_frame(vae_dirs, tmp_path):
    from difftrain.data.moving_digits import write_moving_digits
    from difftrain.models.encoders import build_vae

    spec = write_moving_digits(tmp_path / "clips", n_train=4, n_val=0, shard_size=4, frames=6, size=16, progress=False)
    common = (f"encoders.vae={vae_dirs[0]}", "model.cond=class", "model.num_classes=10", "encoders.text=")
    cfg = config(spec["train"], "data.kind=video", "data.frames=4", "model.frames=4", *common)
    vae = build_vae(str(vae_dirs[0]))
    encode(cfg, tmp_path / "lat", None, vae, dtype="float32", progress=False)
    src, got = members(spec["train"].replace("{00000..00000}", "00000")), members(tmp_path / "lat/00000.tar")
    assert list(got) == list(src) and len(got) == 4
    decoder = SampleDecoder("video", 1, [(16, 16)], frames=4)
    # [4, T, 1, H, W], the middle clip as the encoder takes it
    clips = torch.stack([decoder({"__key__": k, **v}, lambda _: 0.5)["pixels"] for k, v in src.items()])
    means = torch.stack([load(v["safetensors"])["latent_mean"] for v in got.values()])
    assert means.shape == (4, 4, 4, 8, 8)
    torch.testing.assert_close(means, vae.encode(clips))  # the VAE's own per-frame path
    lcfg = config(f"{tmp_path}/lat/00000.tar", "data.kind=latent", "data.batch_size=4", "model.frames=4", *common)
    batch = next(iter(ShardLoader.from_config(lcfg.data, 0, 1, 0)))
    stage = PretrainStage(Shared.parts(lcfg, CPU, conditioner=Conditioner(lcfg.model, None, CPU), vae=_NoVAE()))
    assert stage.frozen(batch, 0)["x0"].shape == (4, 4, 4, 8, 8)
