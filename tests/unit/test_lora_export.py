"""LoRA export for serving (issue 17, 5a; ../shared/PEERS.md D1): each adapter is loaded by the stock client onto the
exported base model (the text UNet's diffusers LoRA file by ``UNet2DConditionModel.load_lora_adapter`` and a
``StableDiffusionPipeline``'s ``load_lora_weights``; the DiT's, PixArt's and class UNet's peft folder by
``PeftModel.from_pretrained``) with exactly our adapter tensors (none missing, none unexpected); a fresh adapter
leaves the served output unchanged, a trained one changes it, and the served output equals our unmerged model's and
the merged export's (fp32, 1e-5), with alpha != rank and with DoRA; two named adapters load together and, weighted,
equal ours weighted the same. Then the real CLI: a base run, a LoRA run from it, both exported, the adapter applied
to the base export."""
from __future__ import annotations

import copy
import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from difftrain.config import ConfigError
from difftrain.config_checks import load_config
from difftrain.finetune.adapt import apply_changes, changes_of, merge_changes
from difftrain.finetune.lora_export import DIFFUSERS_FILE, export_adapters
from difftrain.models.dit_export import ExportError
from tests.conftest import run_cmd, torchrun
from tests.unit.test_lora import FAMILIES as LORA_FAMILIES, trained_base

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TOL = 1e-5  # fp32: the same sums in another order (split projections, peft's and diffusers' layers)
FAMILIES = {k: [*v, "model.image_size=8"] for k, v in  # small images: the stock models run on 2 CPU cores here
            {**LORA_FAMILIES, "unet_text": ["model.name=UNet-T", "model.cond=text", "encoders.text=minilm"]}.items()}
TARGETS = {  # every group each family has; the DiT also its timestep embedder (diffusers keeps a copy per block)
    "dit_class": "[attn, mlp, modulation, 't_embed\\.mlp\\.0']",
    "dit_text": "[attn, cross_attn, mlp, modulation]",
    "unet": "[attn, modulation]",
    "unet_text": "[attn, cross_attn, mlp, modulation]",
}


def _model(family: str, adapt: str, **model_args):
    """(changes, trained base model, the changed model, inputs): as tests/unit/test_lora.py's, text UNet too."""
    cfg = load_config(None, [*FAMILIES[family], f"adapt={adapt}",
                             *(f"model.args.{k}={v}" for k, v in model_args.items())])
    acfg, base = trained_base(cfg)
    side, c = acfg.image_size, acfg.in_channels
    x = torch.randn(2, c, side, side)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cond = ({"text_states": torch.randn(2, 5, 384), "text_mask": mask} if cfg.model.cond == "text"
            else {"class_labels": torch.tensor([1, 2])})
    changes = changes_of(cfg)
    return changes, base.eval(), apply_changes(copy.deepcopy(base), changes, seed=0).eval(), (x, torch.rand(2), cond)


def _train(model, changes, seed: int = 1) -> None:
    """Non-zero adapters (what training gives); DoRA's magnitudes moved off their init too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))


def _call(dmodel, inputs):
    """A diffusers model (or a peft model wrapping one) on our inputs, in its own calling convention."""
    x, t, cond = inputs
    kw = ({"encoder_hidden_states": cond["text_states"], "encoder_attention_mask": cond["text_mask"]}
          if "text_states" in cond else {"class_labels": cond["class_labels"]})
    with torch.no_grad():
        return dmodel(x, timestep=t * 1000, **kw).sample


def _export_model(model, out):
    cls = model.save_diffusers(model.state_dict(), out)
    return getattr(diffusers, cls).from_pretrained(str(out)).eval()


def _file_tensors(folder) -> dict[str, torch.Tensor]:
    """The adapter file's tensors by module path + kind (``lora_A`` / ``lora_B`` / ``lora_magnitude_vector``)."""
    f = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    with safe_open(str(f), "pt") as fh:
        out = {}
        for k in fh.keys():
            key = k.removeprefix("base_model.model.").removeprefix("unet.")
            out[key.removesuffix(".weight")] = fh.get_tensor(k)
        return out


def _loaded_tensors(dmodel, adapter: str) -> dict[str, torch.Tensor]:
    """The stock-loaded model's tensors of ``adapter``, keyed as :func:`_file_tensors`."""
    out = {}
    for k, v in dmodel.state_dict().items():
        if f".{adapter}." in k and ".lora_" in k:
            key = k.removeprefix("base_model.model.").replace(f".{adapter}.", ".")
            out[key.removesuffix(".weight")] = v
    return out


def _serve(base_dir, lora_dir, adapter: str):
    """The stock client: the exported base loaded with diffusers, the adapter applied by its loader."""
    meta = json.loads((lora_dir / "adapter_config.json").read_text()) if (lora_dir / "adapter_config.json").is_file() \
        else None
    cls = json.loads((base_dir / "config.json").read_text())["_class_name"]
    dmodel = getattr(diffusers, cls).from_pretrained(str(base_dir)).eval()
    if meta is None:  # diffusers' LoRA file
        dmodel.load_lora_adapter(str(lora_dir), weight_name=DIFFUSERS_FILE, prefix="unet", adapter_name=adapter)
        return dmodel
    from peft import PeftModel

    return PeftModel.from_pretrained(dmodel, str(lora_dir), adapter_name=adapter).eval()


@pytest.mark.parametrize("family,dora", [(f, False) for f in sorted(TARGETS)]
                         + [("dit_text", True), ("unet_text", True)],  # DoRA: a split magnitude, in each format
                         ids=lambda v: {False: "lora", True: "dora"}.get(v, v))
def test_stock_loaded_adapter_serves_our_output(family, dora, tmp_path):
    changes, base, model, inputs = _model(family, f"[{{kind: lora, rank: 4, alpha: 6, dora: {str(dora).lower()}, "
                                                  f"name: style, targets: {TARGETS[family]}}}]")
    fresh = export_adapters(model, changes, tmp_path / "fresh")["style"]
    assert fresh["loader"] == ("diffusers" if family == "unet_text" else "peft")
    _train(model, changes)
    written = export_adapters(model, changes, tmp_path / "trained")["style"]
    assert (written["rank"], written["alpha"], written["dora"]) == (4, 6.0, dora)
    base_dir = tmp_path / "base"
    served_base = _export_model(base, base_dir)
    merged = _export_model(merge_changes(copy.deepcopy(model), changes), tmp_path / "merged")

    served_fresh = _serve(base_dir, tmp_path / "fresh/lora/style", "style")
    if dora:  # m / ||W|| = 1 up to rounding
        torch.testing.assert_close(_call(served_fresh, inputs), _call(served_base, inputs), rtol=0, atol=TOL)
    else:  # B = 0: exactly the base
        assert torch.equal(_call(served_fresh, inputs), _call(served_base, inputs))

    lora_dir = tmp_path / "trained/lora/style"
    served = _serve(base_dir, lora_dir, "style")
    want, loaded = _file_tensors(lora_dir), _loaded_tensors(served, "style")
    assert loaded.keys() == want.keys()  # no adapter key missing or unexpected
    assert any(k.endswith("lora_magnitude_vector") for k in want) == dora
    assert len([k for k in want if k.endswith(".lora_A")]) == written["modules"]
    for k, v in want.items():
        assert torch.equal(loaded[k], v), k
    if family == "unet_text":  # the metadata's alpha reached the loader: scale alpha / r, not 1
        assert {m.scaling["style"] for m in served.modules() if hasattr(m, "scaling")} == {6 / 4}
    out = _call(served, inputs)
    with torch.no_grad():
        ours = model(*inputs)
    assert (out - _call(served_base, inputs)).abs().max() > 100 * TOL  # the adapter does something
    torch.testing.assert_close(out, ours, rtol=0, atol=TOL)
    torch.testing.assert_close(out, _call(merged, inputs), rtol=0, atol=TOL)


def test_qkv_lora_is_split_by_rows_with_a_shared_a(tmp_path):
    changes, _, model, _ = _model("dit_text", "[{kind: lora, rank: 2, targets: [attn, cross_attn]}]")
    _train(model, changes)
    export_adapters(model, changes, tmp_path)
    got = _file_tensors(tmp_path / "lora/default")
    qkv, kv = model.blocks[0].attn.qkv, model.blocks[0].cross_attn.kv
    for layer, parts in ((qkv, ("attn1.to_q", "attn1.to_k", "attn1.to_v")), (kv, ("attn2.to_k", "attn2.to_v"))):
        b = layer.lora_B["default"].weight
        for i, p in enumerate(parts):
            assert torch.equal(got[f"transformer_blocks.0.{p}.lora_A"], layer.lora_A["default"].weight)
            assert torch.equal(got[f"transformer_blocks.0.{p}.lora_B"], b[i * b.shape[0] // len(parts):
                                                                            (i + 1) * b.shape[0] // len(parts)])


def test_stable_diffusion_pipeline_loads_the_unet_adapter(tmp_path):
    """``pipe.load_lora_weights``, the call users make, on a stock StableDiffusionPipeline around the exported UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    changes, base, model, inputs = _model("unet_text", "[{kind: lora, rank: 4, alpha: 2, targets: [attn, cross_attn]}]")
    _train(model, changes)
    export_adapters(model, changes, tmp_path)
    unet = _export_model(base, tmp_path / "unet")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=unet.config.in_channels)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=384, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=1000))
    pytest.importorskip("tokenizers")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(vocab), str(tmp_path / "merges.txt"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "lora/default"), adapter_name="default")
    assert _loaded_tensors(pipe.unet, "default").keys() == _file_tensors(tmp_path / "lora/default").keys()
    with torch.no_grad():
        torch.testing.assert_close(_call(pipe.unet, inputs), model(*inputs), rtol=0, atol=TOL)


@pytest.mark.parametrize("family", ["dit_class", "unet_text"])
def test_two_named_adapters_combine_with_weights_as_ours(family, tmp_path):
    changes, base, model, inputs = _model(family, "[{kind: lora, rank: 2, alpha: 4, name: style, targets: [attn]}, "
                                                  "{kind: lora, rank: 4, name: detail, targets: [attn, mlp]}]")
    _train(model, changes)
    written = export_adapters(model, changes, tmp_path)
    assert sorted(written) == ["detail", "style"]
    base_dir = tmp_path / "base"
    _export_model(base, base_dir)
    weights = {"style": 0.7, "detail": -0.4}
    with torch.no_grad():
        both = model(*inputs)  # both adapters at full strength: the merged export's model
        for m in model.modules():
            if hasattr(m, "set_scale"):
                for name, w in weights.items():
                    if name in m.lora_A:
                        m.set_scale(name, w)
        ours = model(*inputs)
    if family == "unet_text":
        served = _serve(base_dir, tmp_path / "lora/style", "style")
        served.load_lora_adapter(str(tmp_path / "lora/detail"), weight_name=DIFFUSERS_FILE, prefix="unet",
                                 adapter_name="detail")
        served.set_adapters(["style", "detail"])
        torch.testing.assert_close(_call(served, inputs), both, rtol=0, atol=TOL)
        served.set_adapters(list(weights), list(weights.values()))
    else:
        served = _serve(base_dir, tmp_path / "lora/style", "style")
        served.load_adapter(str(tmp_path / "lora/detail"), adapter_name="detail")
        served.base_model.set_adapter(["style", "detail"])
        torch.testing.assert_close(_call(served, inputs), both, rtol=0, atol=TOL)
        served.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
        served.set_adapter("mix")
    torch.testing.assert_close(_call(served, inputs), ours, rtol=0, atol=TOL)


def test_what_cannot_be_exported_is_refused_in_one_line():
    changes, _, model, _ = _model("dit_class", "[{kind: lora, targets: [attn, 'g_embed\\.mlp\\.0']}]",
                                  guidance_embed="true")
    with pytest.raises(ExportError, match=r"LoRA adapter 'default' \(adapt\[0\]\): g_embed\.mlp\.0 has no diffusers "
                                          "Linear counterpart"):
        export_adapters(model, changes, "unused")
    for name in ("style/v2", "style.v2"):  # a folder name and a peft adapter name: refused with the config
        with pytest.raises(ConfigError, match=rf"config key 'adapt\[0\]\.name' = '{re.escape(name)}': an adapter's name"):
            _model("dit_class", f"[{{kind: lora, name: {name}}}]")
    changes, _, model, _ = _model("dit_video", "[{kind: lora}]")
    with pytest.raises(ExportError, match="cannot export the LoRA adapters of a VideoDiT"):
        export_adapters(model, changes, "unused")


def test_cli_export_writes_the_adapter_for_the_init_run(digits, tmp_path):
    """A base run, a LoRA run from it (``init_from=BASE@ema``), both exported by ``difftrain export``: the adapter
    loads onto the base's export and serves the LoRA run's merged export; difftrain.json names the base."""
    from difftrain.train.sources import Source
    from tests.distributed.test_distill_stages import SMALL
    from tests.distributed.test_lora_dist import LORA

    base = f"{SMALL} data.train={digits['train']} optim.warmup_steps=0"  # 3 steps that move the weights
    torchrun(1, ["tests/distributed/train_job.py", str(tmp_path / "job"), "base", f"{base} run.steps=3 "
                 f"run.dir={tmp_path}/base", "lora", f"{base} {LORA} run.steps=3 init_from={tmp_path}/base@ema "
                 f"run.dir={tmp_path}/lora"])
    for run in ("base", "lora"):
        p = run_cmd([sys.executable, "-m", "difftrain", "export", str(tmp_path / run), "--out",
                     str(tmp_path / f"e_{run}")])
    assert "LoRA adapter 'default'" in p.stdout and f"{tmp_path}/base@ema" in p.stdout
    meta = json.loads((tmp_path / "e_lora/difftrain.json").read_text())
    fingerprint = Source.parse("init_from", f"{tmp_path}/base@ema").fingerprint()
    assert meta["lora"]["base"] == {k: fingerprint[k] for k in ("source", "step", "sha256")}
    assert meta["lora"]["adapters"]["default"]["alpha"] == 8.0
    assert "lora" not in json.loads((tmp_path / "e_base/difftrain.json").read_text())
    served = _serve(tmp_path / "e_base", tmp_path / "e_lora/lora/default", "default")
    cls = meta["diffusers_class"]
    merged = getattr(diffusers, cls).from_pretrained(str(tmp_path / "e_lora")).eval()
    plain = getattr(diffusers, cls).from_pretrained(str(tmp_path / "e_base")).eval()
    m = meta["model"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m["in_channels"], m["image_size"], m["image_size"], generator=g)
    inputs = (x, torch.rand(2, generator=g), {"class_labels": torch.tensor([3, m["num_classes"]])})  # class DiT
    out = _call(served, inputs)
    # 3 steps of a tiny DiT move its (adaLN-Zero gated, near-zero) output by ~7e-4; the served output is within
    # ~3e-8 of the merged export's
    assert (out - _call(plain, inputs)).abs().max() > 10 * TOL
    torch.testing.assert_close(out, _call(merged, inputs), rtol=0, atol=TOL)
