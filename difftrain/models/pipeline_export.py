"""A whole diffusers pipeline folder: ``difftrain export RUN --out DIR --pipeline``.

``DiffusionPipeline.from_pretrained(DIR)`` loads the stock ``PixArtSigmaPipeline`` with our components and, called
with the arguments written to ``difftrain.json``'s ``pipeline.call`` (and ``latents`` = the initial noise), gives the
images ``difftrain sample`` gives (tests/unit/test_pipeline_export.py). The folder is what diffusers writes itself:

    model_index.json   _class_name PixArtSigmaPipeline; each component's (library, class)
    transformer/       PixArtTransformer2DModel (models/dit_export.py)
    scheduler/         the stock scheduler of the run's sampler and step count (models/scheduler_export.py)
    vae/               the run's AutoencoderKL, its shift_factor folded into its 1x1 quant convs (below)
    text_encoder/, tokenizer/   the run's text encoder (e.g. MiniLM: BertModel, BertTokenizer) by save_pretrained
    difftrain.json     what ``difftrain export`` writes, plus ``pipeline``: the class and the call arguments

Why each call argument (every claim read from diffusers 0.42.1's ``pipelines/pixart_alpha/pipeline_pixart_sigma.py``):

* ``max_sequence_length`` = ``encoders.text_max_length``: the pipeline tokenises with ``padding="max_length"``,
  ``truncation=True`` and passes the attention mask to the text encoder and the transformer, as our ``TextEncoder``
  does, at this length (its default, 300, is T5's). The encoder's output is ``text_encoder(ids, attention_mask)[0]``,
  the ``last_hidden_state`` we use.
* ``clean_caption=False`` (its default): the caption is then only ``lower().strip()``-ed, which an uncased tokenizer
  (``do_lower_case``, MiniLM's) does itself; with a cased one (T5's) only lower-case, stripped captions give our
  images (``pipeline.captions`` says which). ``clean_caption=True`` would rewrite the caption.
* ``negative_prompt=""`` (its default): the unconditional branch is the encoding of ``""`` padded to the same
  length: our null caption (``TextEncoder.null_states``, what the trainer's caption dropout feeds).
* ``use_resolution_binning=False``: otherwise it snaps height/width to PixArt's aspect-ratio bins (and refuses a
  ``sample_size`` other than 32/64/128). ``height``/``width`` default to ``sample_size`` x the VAE's downsampling.
* ``guidance_scale`` = the run's CFG scale w: it guides the model output, uncond + w (cond - uncond), which is our
  guided x0^ since x0^ is affine in the output with the same coefficients for both branches; it guides only
  when w > 1 (ours whenever w != 1).
* ``num_inference_steps`` = the run's step count, the one the scheduler reproduces (scheduler_export.py).
* ``latents``: our initial noise (``difftrain sample``'s is ``keyed_randn(seed, 0, range(n), shape, "sample")``);
  the pipeline multiplies it by ``init_noise_sigma`` = 1 on the VP schedulers. A stochastic sampler (multistep
  consistency / LCM) also draws fresh noise each step from the pipeline's ``generator``, not our keyed noise: the same
  distribution, not the same images (``pipeline.deterministic`` is false).

The VAE: the pipeline decodes ``vae.decode(latents / scaling_factor)``, with no ``shift_factor``; we decode
z = latents / scaling_factor + shift_factor. With the shift folded into the 1x1 ``post_quant_conv`` (bias += W shift)
and out of ``quant_conv``'s mean channels (bias -= shift), the exported VAE encodes to and decodes from our latents
exactly with ``shift_factor`` unset; a VAE without those convs (``use_quant_conv=False``) and a non-zero shift is
refused (folding into the 3x3 ``conv_in`` is not exact at the zero-padded border).

Refused, one line naming why (``ExportError``), before anything is written: class-conditional runs (``DiTPipeline``
takes its null class as 1000 and no initial latents), unconditional and video runs (no stock pipeline), pixel space
(the PixArt pipelines decode through a VAE), a ControlNet (no control input), a CFG scale below 1 (they guide only
above 1), the UNet (``StableDiffusionPipeline`` passes no attention mask to the UNet's cross-attention, which ours
masks), rectified flow (the PixArt pipelines read ``scheduler.init_noise_sigma``, which diffusers' flow-matching
schedulers lack) and every sampler without a stock scheduler (scheduler_export.py's reason).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from difftrain.models.dit_export import ExportError

PIPELINE = "PixArtSigmaPipeline"
TRANSFORMER, VAE_DIR, TEXT_DIR, TOKENIZER_DIR = "transformer", "vae", "text_encoder", "tokenizer"


def refusal(g) -> str | None:
    """Why no stock pipeline reproduces the run's sampling (``g``: ``eval.generator.Generator``), or None."""
    from difftrain.models.scheduler_export import NoScheduler, scheduler_for

    if getattr(g.acfg, "frames", 0) > 0:
        return "a video model: no stock diffusers pipeline takes our video DiT"
    if g.cond == "class":
        return (f"class-conditional: DiTPipeline takes its null class as 1000 (ours is model.num_classes = "
                f"{g.cfg.model.num_classes}) and no initial latents")
    if g.cond != "text":
        return "unconditional: no stock diffusers pipeline serves an unconditional DiT / UNet from initial latents"
    from difftrain.finetune.adapt import changes_of

    for c in changes_of(g.cfg):  # LoRA and DiffFit merge into the plain transformer; a ControlNet adds an input
        if not c.mergeable:
            return (f"{c.key}.kind = {c.kind!r}: the served model takes more than the plain transformer (a control "
                    "image), which the PixArt pipelines cannot pass")
    if not g.cfg.encoders.vae:
        return "pixel space (encoders.vae unset): the PixArt pipelines decode through a VAE"
    from difftrain.models.unet import UNet

    if isinstance(g.model, UNet):
        return ("StableDiffusionPipeline passes no attention mask to the UNet's cross-attention, which ours masks "
                "(the padding tokens would be attended to)")
    if g.diffusion.path.name == "rf":
        return ("diffusion.path=rf: the PixArt pipelines read scheduler.init_noise_sigma, which diffusers' flow-"
                "matching schedulers lack (serve rf with scheduler_export.py's scheduler loop)")
    if g.sampling.guidance < 1:
        return (f"the run's CFG scale {g.sampling.guidance:g} < 1: the PixArt pipelines guide only above 1 "
                "(ours whenever it is not 1)")
    vae = g.vae.vae
    if g.vae.shift_factor and not (vae.quant_conv is not None and vae.post_quant_conv is not None):
        return (f"the VAE's shift_factor {g.vae.shift_factor:g}, which the PixArt pipelines do not apply, cannot be "
                "folded into it (use_quant_conv / use_post_quant_conv off)")
    try:
        scheduler_for(g.diffusion, g.sampling.sampler, g.sampling.steps)
    except NoScheduler as e:
        return str(e)
    return None


def folded_vae(vae):
    """A copy of the AutoencoderKL with ``shift_factor`` folded into its 1x1 quant convs, so that with
    ``shift_factor`` unset it maps pixels to our latents ``(z - shift) * scaling_factor`` and back (module doc)."""
    out = copy.deepcopy(vae)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    if shift:
        C = out.config.latent_channels
        with torch.no_grad():
            out.quant_conv.bias[:C] -= shift  # the posterior's mean channels: z - shift (a sample moves with it)
            w = out.post_quant_conv.weight  # [C, C, 1, 1]: W (z' + shift) + b = W z' + (b + shift sum_j W_ij)
            out.post_quant_conv.bias += shift * w.sum(dim=(1, 2, 3))
    out.register_to_config(shift_factor=None)
    return out


def call_arguments(g) -> dict:
    """The keyword arguments of ``pipe(prompt, ...)`` that reproduce ``difftrain sample`` (module doc)."""
    return {"num_inference_steps": g.sampling.steps, "guidance_scale": g.sampling.guidance,
            "max_sequence_length": g.cfg.encoders.text_max_length, "clean_caption": False, "negative_prompt": "",
            "use_resolution_binning": False}


def export_pipeline(g, state: dict[str, torch.Tensor], out_dir: str | Path) -> tuple[str, dict, dict]:
    """Write the pipeline folder for ``g`` with the model weights ``state`` (EMA); returns (the transformer's class,
    ``write_scheduler``'s entry, the ``difftrain.json`` ``pipeline`` entry). ``ExportError`` (before anything is
    written) where no stock pipeline reproduces the run."""
    import diffusers

    from difftrain.diffusion.samplers import STOCHASTIC
    from difftrain.models.scheduler_export import write_scheduler

    why = refusal(g)
    if why:
        raise ExportError(f"cannot export a diffusers pipeline: {why}")
    out = Path(out_dir)
    cls_name = g.model.save_diffusers(state, out / TRANSFORMER)
    scheduler = write_scheduler(out, g.diffusion, g.sampling.sampler, g.sampling.steps)
    folded_vae(g.vae.vae).save_pretrained(str(out / VAE_DIR), safe_serialization=True)
    text = g.conditioner.text_encoder
    text.model.save_pretrained(str(out / TEXT_DIR), safe_serialization=True)
    text.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    index = {"_class_name": PIPELINE, "_diffusers_version": diffusers.__version__,
             TRANSFORMER: ["diffusers", cls_name], "scheduler": ["diffusers", scheduler["class"]],
             VAE_DIR: ["diffusers", type(g.vae.vae).__name__],
             TEXT_DIR: ["transformers", type(text.model).__name__],
             TOKENIZER_DIR: ["transformers", type(text.tokenizer).__name__]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    deterministic = g.sampling.sampler not in STOCHASTIC or g.sampling.steps == 1
    # the pipeline lower-cases and strips every caption (clean_caption=False), which an uncased tokenizer does itself
    captions = "any" if getattr(text.tokenizer, "do_lower_case", False) else "lower-case, stripped"
    return cls_name, scheduler, {"class": PIPELINE, "call": call_arguments(g), "deterministic": deterministic,
                                 "captions": captions}
