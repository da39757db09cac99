"""Reflow pairs (difftrain/distill/pairs.py): each pair is the keyed noise and the teacher's ODE solution from it;
the shards are latent shards the loader reads with their noise; reruns skip, resume bit-identically and refuse
another request. The teacher is a tiny randomly initialised DiT saved as a ``difftrain export`` folder."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load, save

from difftrain.config import ConfigError, to_dict
from difftrain.config_checks import load_config
from difftrain.data.decode import SkipSample
from difftrain.data.latents import load_latent_data
from difftrain.data.loader import ShardLoader
from difftrain.data.samples import SampleDecoder
from difftrain.diffusion.guidance import guided_denoiser
from difftrain.diffusion.keyed import keyed_randn
from difftrain.diffusion.samplers import SAMPLERS, time_grid
from difftrain.distill.pairs import PairWriter, write_pairs
from difftrain.eval.generator import load_generator
from difftrain.models import registry
from difftrain.sampling import generate
from difftrain.train.build import build_encoders, model_config
from tests.conftest import REPO, tiny_vae
from tests.unit.test_latents import files, members
from tests.distributed.test_resume import COMMON

CPU = torch.device("cpu")
SOLVER, STEPS, GUIDANCE = "heun", 3, 2.0
PROMPTS = ["a handwritten digit 3", "a handwritten digit 1", "a handwritten digit 4"]


def teacher_config(cond: str, *extra: str):
    """COMMON's small DiT (class, text); unconditional: a small UNet (no diffusers DiT class exports one)."""
    args = [a for a in COMMON[1:] if not a.startswith(("model.cond", "encoders.text"))]
    if cond == "none":
        args = [a for a in args if not a.startswith(("model.name", "model.args"))]
    conds = {"class": ["model.cond=class", "encoders.text="], "text": ["model.cond=text"],
             "none": ["model.cond=none", "encoders.text=", "model.name=UNet-T",
                      "model.args.block_out_channels=[16,32]"]}[cond]
    return load_config(REPO / COMMON[0], [*args, *conds, "run.sample_steps=2", "run.sample_sampler=euler",
                                          "run.sample_guidance=1.5", *extra])


def export_teacher(cfg, folder, step: int = 7):
    """A tiny DiT with random (not zero-initialised) weights, saved as ``difftrain export`` writes it."""
    text, vae = build_encoders(cfg, CPU)
    arch, acfg = model_config(cfg, text.dim if text is not None else 0, vae.latent_channels)
    model = registry.materialize(registry.build(arch, acfg), CPU, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cls_name = model.save_diffusers(model.state_dict(), folder)
    meta = {"step": step, "diffusers_class": cls_name, "timestep_scale": 1000.0, "arch": arch,
            "diffusion": to_dict(cfg.diffusion), "encoders": to_dict(cfg.encoders), "stage": "pretrain",
            "sampling": {"guidance": cfg.run.sample_guidance, "steps": cfg.run.sample_steps,
                         "sampler": cfg.run.sample_sampler},
            "model": dataclasses.asdict(acfg)}
    (folder / "difftrain.json").write_text(json.dumps(meta, indent=1))
    return folder


def vae_config(vae, *extra: str):
    """A class-conditioned latent-space teacher: 16 px RGB -> 4 x 8 x 8 latents (an export assumes 3 channels)."""
    return teacher_config("class", f"encoders.vae={vae}", "data.channels=3", "model.in_channels=4",
                          "model.image_size=8", *extra)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {c: export_teacher(teacher_config(c), root / c) for c in ("class", "text", "none")}
    vae = tiny_vae(root / "tiny_vae", channels=3)
    out["vae"] = export_teacher(vae_config(vae), root / "vae")
    return out


def make_pairs(teacher, out, count=10, **kw):
    kw = {"solver": SOLVER, "steps": STEPS, "guidance": GUIDANCE, "batch": 4, "shard_size": 8, "seed": 3, **kw}
    if teacher.name == "text" and not kw.get("captions_from"):
        kw.setdefault("prompts", PROMPTS)  # an export keeps no run.sample_prompts
    writer = PairWriter(load_generator(teacher, CPU), teacher, count, **kw)
    return writer, write_pairs(writer, out, progress=False)


@pytest.mark.parametrize("cond", ["class", "text", "none"])
def test_pairs_are_keyed_noise_and_the_teachers_ode(teachers, cond, tmp_path):
    writer, res = make_pairs(teachers[cond], tmp_path)
    g = writer.g
    assert res == {"shards": 2, "mine": 2, "skipped_existing": 0, "written": 10}
    expect = {"encode_info.json", "00000.tar", "00001.tar", *(("null.safetensors",) if cond == "text" else ())}
    assert set(files(tmp_path)) == expect
    shape = (1, 16, 16)
    pairs = {**members(tmp_path / "00000.tar"), **members(tmp_path / "00001.tar")}
    assert list(pairs) == [f"{i:09d}" for i in range(10)] and len(members(tmp_path / "00001.tar")) == 2
    prompts = PROMPTS
    for lo, hi in ((0, 4), (4, 8), (8, 10)):  # the chunks of --batch 4: each computed as one batch
        z = keyed_randn(3, 0, range(lo, hi), shape, "sample")  # difftrain sample's noise of images lo..hi-1
        captions = [prompts[i % len(prompts)] for i in range(lo, hi)] if cond == "text" else None
        labels = torch.arange(lo, hi) % 10 if cond == "class" else None
        c = g.conditioner(captions, labels)
        fn = guided_denoiser(g.model, c, g.conditioner.null(hi - lo) if c else {}, GUIDANCE if c else 1.0,
                             to_x0=g.diffusion.sample_x0)
        x_hat = SAMPLERS[SOLVER](lambda x, t: fn(x, t).float(), z, time_grid(STEPS), path=g.diffusion.path)
        for j, i in enumerate(range(lo, hi)):
            sample = pairs[f"{i:09d}"]
            t = load(sample["safetensors"])
            assert torch.equal(t["noise"], z[j]) and torch.equal(t["latent_mean"], x_hat[j])
            assert t["noise"].dtype == t["latent_mean"].dtype == torch.float32
            assert json.loads(sample["json"])["difftrain"]["latent_shape"] == list(shape)
            if cond == "class":
                assert set(sample) == {"safetensors", "json", "cls"} and int(sample["cls"]) == i % 10
            elif cond == "text":
                assert set(sample) == {"safetensors", "json", "txt"} and sample["txt"].decode() == captions[j]
                assert torch.equal(t["text_states"], c["text_states"][j])
                assert torch.equal(t["text_mask"].bool(), c["text_mask"][j])
            else:
                assert set(sample) == {"safetensors", "json"} and set(t) == {"noise", "latent_mean"}
    # pair i starts from difftrain sample's image i: decoding x^ gives the sample's pixels (same batches of 4)
    images = generate(g.model, g.diffusion, g.conditioner, g.vae, n=8, shape=shape, steps=STEPS, sampler=SOLVER,
                      guidance=GUIDANCE, seed=3, device=CPU, batch_size=4,
                      captions=[prompts[i % len(prompts)] for i in range(8)] if cond == "text" else None,
                      labels=torch.arange(8) % 10 if cond == "class" else None)
    x_hat = torch.stack([load(pairs[f"{i:09d}"]["safetensors"])["latent_mean"] for i in range(8)])
    assert torch.equal(torch.from_numpy(images), ((x_hat.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                       .permute(0, 2, 3, 1))
    info = json.loads((tmp_path / "encode_info.json").read_text())
    assert info["pairs"] == {"teacher": str(teachers[cond].resolve()), "step": 7,
                             "fingerprint": writer.teacher_fingerprint,
                             "solver": SOLVER, "steps": STEPS, "guidance": GUIDANCE, "seed": 3, "count": 10,
                             "batch": 4, "shard_size": 8, "dtype": "float32", "shape": list(shape), "cond": cond,
                             **({"prompts": prompts} if cond == "text" else {}),
                             **({"num_classes": 10} if cond == "class" else {})}
    assert info["shards"] == ["00000.tar", "00001.tar"] and info["source"]["buckets"] == [[16, 16]]


def test_defaults_are_the_teachers_sampling(teachers, tmp_path):
    writer = PairWriter(load_generator(teachers["class"], CPU), teachers["class"], 3)
    assert (writer.solver, writer.steps, writer.guidance) == ("euler", 2, 1.5)
    writer = PairWriter(load_generator(teachers["class"], CPU), teachers["class"], 3, solver="dpm++2m")
    assert writer.solver == "dpmpp_2m"


@pytest.mark.parametrize("cond", ["class", "text"])
def test_loader_reads_pairs_with_their_noise(teachers, cond, tmp_path):
    make_pairs(teachers[cond], tmp_path, count=12, dtype="float16")
    stored = {k: load(s["safetensors"]) for n in ("00000", "00001") for k, s in members(tmp_path / f"{n}.tar").items()}
    cfg = teacher_config(cond, "data.kind=latent", f"data.train={tmp_path}/{{00000..00001}}.tar", "data.batch_size=5",
                         "data.num_workers=0", "data.shuffle_buffer=0",
                         f"data.require_caption={cond == 'text'}")  # class pairs have labels, no captions
    text, vae = build_encoders(cfg, CPU)
    # the shards' encode_info passes the run's encoder checks
    data = load_latent_data(cfg.data, cfg.encoders, cfg.model.cond, text, vae)
    assert (data.null_text is not None) == (cond == "text")
    seen = set()
    for _, batch in zip(range(3), ShardLoader.from_config(cfg.data, 0, 1, 0)):
        assert batch["noise"].shape == batch["latent_mean"].shape == (5, 1, 16, 16)
        assert batch["noise"].dtype == torch.float16 and "latent_std" not in batch
        for j, key in enumerate(batch["keys"]):
            assert torch.equal(batch["noise"][j], stored[key]["noise"])
            assert torch.equal(batch["latent_mean"][j], stored[key]["latent_mean"])
            if cond == "class":
                assert batch["labels"][j] == int(key) % 10
            else:
                assert torch.equal(batch["text_states"][j], stored[key]["text_states"])
            seen.add(key)
    assert len(seen) == 12  # 15 rows: every pair, then the next epoch


def test_noise_of_the_wrong_shape_is_a_bad_latent(teachers, tmp_path):
    make_pairs(teachers["class"], tmp_path, count=4)
    good = next(iter(members(tmp_path / "00000.tar").values()))
    decoder = SampleDecoder("latent", 1, [(16, 16)])
    assert decoder({"__key__": "k", **good}, None)["noise"].shape == (1, 16, 16)
    t = load(good["safetensors"])
    for noise in (t["noise"][:, :8], t["noise"].long()):
        with pytest.raises(SkipSample) as e:
            decoder({"__key__": "k", **good, "safetensors": save({**t, "noise": noise})}, None)
        assert e.value.reason == "bad_latent"


def test_rerun_resumes_bit_identical_and_refuses_another_request(teachers, tmp_path):
    ref = tmp_path / "ref"
    make_pairs(teachers["class"], ref, count=20)  # shards of 8, 8, 4
    out = tmp_path / "out"
    make_pairs(teachers["class"], out, count=20)
    (out / "00001.tar").unlink()  # as a run killed while writing its second shard leaves it
    (out / "00001.tar.tmp").write_bytes(b"half a shard from a killed run")
    (out / "00002.tar").unlink()
    _, res = make_pairs(teachers["class"], out, count=20)
    assert res["skipped_existing"] == 1 and res["written"] == 12
    assert files(out) == files(ref)
    _, res = make_pairs(teachers["class"], out, count=20)
    assert res["skipped_existing"] == 3 and res["written"] == 0 and files(out) == files(ref)
    with pytest.raises(ConfigError, match=rf"--out {out} holds other pairs: pairs\.steps in its encode_info"):
        make_pairs(teachers["class"], out, count=20, steps=4)
    with pytest.raises(ConfigError, match=r"pairs\.count, shards in"):
        make_pairs(teachers["class"], out, count=30)


def test_request_errors_are_one_line(teachers, tmp_path):
    g = load_generator(teachers["class"], CPU)
    for kw, msg in (({"batch": 4, "shard_size": 6}, "--shard-size 6 must be a positive multiple of --batch 4"),
                    ({"prompts": ["a 7"]}, "--prompt / --captions-from are for text-conditioned teachers"),
                    ({"solver": "rk45"}, "unknown sampler 'rk45'"), ({"dtype": "bfloat16"}, "--dtype")):
        with pytest.raises(ConfigError, match=msg):
            PairWriter(g, teachers["class"], 8, **kw)
    with pytest.raises(ConfigError, match="--prompt: the text-conditioned teacher .* has no run.sample_prompts"):
        PairWriter(load_generator(teachers["text"], CPU), teachers["text"], 8)


def test_captions_from_the_training_shards(teachers, digits, tmp_path):
    """``--captions-from``: the first COUNT captions of the shards in order (InstaFlow pairs LAION's own captions),
    recorded by spec, count and hash; the pairs carry them as KEY.txt."""
    from difftrain.data.tario import read_shard
    from difftrain.distill.pairs import read_captions

    first = [s["txt"].decode().strip() for s, _ in read_shard(digits["train"].replace("{00000..00006}", "00000"))]
    assert read_captions(digits["train"], 5) == first[:5]
    writer, _ = make_pairs(teachers["text"], tmp_path, count=6, prompts=None, captions_from=digits["train"])
    pairs = members(tmp_path / "00000.tar")  # 6 pairs: one shard of 8
    assert [v["txt"].decode() for v in pairs.values()] == first[:6]
    info = writer.info()["pairs"]
    assert info["captions_from"] == digits["train"] and info["captions"] == 6 and "prompts" not in info
    with pytest.raises(ConfigError, match="give --prompt or --captions-from, not both"):
        PairWriter(writer.g, teachers["text"], 6, prompts=PROMPTS, captions_from=digits["train"])
    with pytest.raises(ConfigError, match=r"--captions-from .*/nope/\{0\.\.1\}\.tar"):
        read_captions(str(tmp_path / "nope/{0..1}.tar"), 3)


def test_cli_writes_the_same_shards(teachers, tmp_path, capsys):
    from difftrain.cli import main

    make_pairs(teachers["none"], tmp_path / "api", count=6)
    args = ["distill", "pairs", str(teachers["none"]), "--out", str(tmp_path / "cli"), "--count", "6",
            "--solver", SOLVER, "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--batch", "4", "--shard-size", "8",
            "--seed", "3"]
    main(args)
    assert files(tmp_path / "cli") == files(tmp_path / "api")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("pairs: 1/1 shards (6 pairs) of teacher step 7") and "{00000..00000}.tar" in line
    with pytest.raises(SystemExit) as e:
        main(args[:-1] + ["4"])
    assert e.value.code == 2
    assert "pairs: pairs.seed in" in capsys.readouterr().err


def test_a_latent_teacher_pairs_latents(teachers, tmp_path):
    """With a VAE the pairs are latents [4, 8, 8] (not decoded); decoded, they are difftrain sample's images."""
    writer, _ = make_pairs(teachers["vae"], tmp_path, count=8, solver="euler", steps=2)
    g = writer.g
    stored = {k: load(s["safetensors"]) for k, s in members(tmp_path / "00000.tar").items()}
    x_hat = torch.stack([stored[f"{i:09d}"]["latent_mean"] for i in range(8)])
    assert x_hat.shape == (8, 4, 8, 8)
    assert torch.equal(torch.stack([stored[f"{i:09d}"]["noise"] for i in range(8)]),
                       keyed_randn(3, 0, range(8), (4, 8, 8), "sample"))
    images = generate(g.model, g.diffusion, g.conditioner, g.vae, n=8, shape=(4, 8, 8), steps=2, sampler="euler",
                      guidance=GUIDANCE, seed=3, device=CPU, batch_size=4, labels=torch.arange(8) % 10)
    with torch.no_grad():
        pixels = torch.cat([g.vae.decode(x_hat[:4]), g.vae.decode(x_hat[4:])]).float().clamp(-1, 1)
    assert torch.equal(torch.from_numpy(images), ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    info = json.loads((tmp_path / "encode_info.json").read_text())
    assert info["latent"]["space"] == "vae" and not info["latent"]["std"] and info["source"]["buckets"] == [[16, 16]]
    vae = info["encoders"]["vae"]
    cfg = vae_config(vae, "data.kind=latent", f"data.train={tmp_path}/00000.tar", "data.image_size=16",
                     "data.batch_size=4", "data.num_workers=0", "data.require_caption=false")
    text, v = build_encoders(cfg, CPU)
    # the run's VAE (weights compared) accepts the shards
    load_latent_data(cfg.data, cfg.encoders, cfg.model.cond, text, v)
    batch = next(iter(ShardLoader.from_config(cfg.data, 0, 1, 0)))
    assert batch["noise"].shape == batch["latent_mean"].shape == (4, 4, 8, 8) and "latent_std" not in batch
