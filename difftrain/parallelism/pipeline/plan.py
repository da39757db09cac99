"""``difftrain plan CONFIG --gpus N``: the best (pipeline ranks S, data-parallel D, micro-batches M, frozen-work
mode, DDP/FSDP) for a cluster, from FLOP-based costs of the real model classes built on the meta device.

CONFIG is a preset (``PRESETS``: DiT-XL/2 at 256 px with T5-XXL + SD-VAE, and a 30B DiT that does not fit one
80 GB GPU) or a run config YAML (its model, encoders and global batch; encoder folders are read for their
``config.json`` only). Every candidate is cut by :func:`partition.partition` and timed by
:func:`simulate.simulate`; the plan prints the fastest that fits in memory and why (the runner-up of each kind,
what does not fit). Assumptions (utilisation, bandwidths, 16 bytes per trained parameter for bf16 weights and
gradients + fp32 Adam state, ZeRO's count, Rajbhandari et al. 2020, sec. 3.1) are printed with the plan.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.parallelism.pipeline.costs import (HARDWARE, BlockCost, FrozenCost, Hardware, Profile,
                                                  meta_inputs, profile_blocks, profile_frozen)
from difftrain.parallelism.pipeline.partition import partition
from difftrain.parallelism.pipeline.simulate import SimResult, simulate

PRESETS = {
    "dit_xl2_256": dict(
        about="DiT-XL/2 (Peebles & Xie 2023) text-to-image at 256 px: SD-VAE latents 32x32x4, T5-XXL captions "
              "(120 tokens, as PixArt-alpha)",
        dit=dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2), px=256, text="t5_xxl", text_tokens=120,
        vae="sd", global_batch=1024),
    "dit_30b_256": dict(
        about="a 30B-parameter DiT (depth 36, width 7168, with cross-attention) at 256 px with T5-XXL + SD-VAE: 480 GB of weights and "
              "Adam state, too large for one 80 GB GPU",
        dit=dict(depth=36, hidden_size=7168, num_heads=56, patch_size=2), px=256, text="t5_xxl", text_tokens=120,
        vae="sd", global_batch=1024),
}


@dataclass
class Candidate:
    pp: int  # pipeline ranks S (pipeline segments: S, or 2S with two per rank)
    dp: int
    n_mb: int
    mode: str
    fsdp: bool
    bounds: list
    result: SimResult
    fits: bool
    throughput: float  # samples/s over the cluster
    schedule: str = "1f1b"
    profile: Profile | None = None  # the per-micro-batch costs it was simulated with
    dp_bw: float = float("inf")

    def describe(self) -> str:
        eng = "fsdp" if self.fsdp else "ddp"
        kind = ("data parallel" if self.pp == 1 else
                f"pp={self.pp} {self.schedule} M={self.n_mb} frozen={self.mode}")
        mem = max(m["total"] for m in self.result.memory) / 1e9
        idle = max(self.result.idle) * 100
        return (f"{kind}, dp={self.dp} ({eng}): {self.result.time * 1e3:.4g} ms/iter, {self.throughput:,.0f} img/s, "
                f"max idle {idle:.0f}%, peak memory {mem:.1f} GB{'' if self.fits else ' (does not fit)'}")


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu",
                   vocab_size=32128)  # google/t5-v1_1-xxl
    return T5EncoderModel(cfg)


def _sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def preset_profile(name: str, hw: Hardware) -> tuple[Profile, int, str, torch.nn.Module]:
    """(per-sample profile, global batch, description, the backbone on meta) of a preset, counted on the meta device
    in bf16."""
    from difftrain.models.dit import DiT, DiTConfig

    p = PRESETS[name]
    with torch.device("meta"):
        text = _t5_xxl().to(torch.bfloat16)
        vae = _sd_vae()  # fp32 (diffusers warns on a bf16 cast); FLOPs do not depend on the dtype
        dim = text.config.d_model
        model = DiT(DiTConfig(image_size=p["px"] // 8, in_channels=4, num_classes=0, text_dim=dim, **p["dit"]))
        model = model.to(torch.bfloat16)
        L = p["text_tokens"]
        inputs = meta_inputs(model.config, 0, L, dtype=torch.bfloat16)
        ids = torch.zeros(1, L, dtype=torch.long)
        img = torch.randn(1, 3, p["px"], p["px"])
        blocks = profile_blocks(model, inputs, "flops", hw)
        frozen = [profile_frozen("t5_xxl", lambda: text(input_ids=ids).last_hidden_state, "flops", hw,
                                 params=_params(text)),
                  profile_frozen("sd_vae_encoder", lambda: vae.encode(img).latent_dist.mean, "flops", hw,
                                 params=_params(vae.encoder) + _params(vae.quant_conv))]
    return Profile(blocks, frozen, 1, hw.p2p_bw, hw.latency), p["global_batch"], p["about"], model


def config_profile(path: str, hw: Hardware, overrides: tuple = ()) -> tuple[Profile, int, str, torch.nn.Module]:
    """The profile of a run config's model and encoders (built on meta from their config.json files), its global
    batch, a description and the backbone on meta."""
    import json

    from difftrain.config import ConfigError
    from difftrain.config_checks import load_config
    from difftrain.models.registry import arch_config, build

    cfg = load_config(path, overrides)
    frozen_mods = []
    text_dim, L = 0, cfg.encoders.text_max_length
    with torch.device("meta"):
        if cfg.encoders.text:
            import transformers as tf

            from difftrain.models.encoders import TEXT_ALIASES, _sub

            root = Path(TEXT_ALIASES[cfg.encoders.text]() if cfg.encoders.text in TEXT_ALIASES else cfg.encoders.text)
            if not (_sub(root, "text_encoder") / "config.json").is_file():
                raise ConfigError(f"config key 'encoders.text' = {cfg.encoders.text!r}: no config.json to plan from")
            tcfg = tf.AutoConfig.from_pretrained(str(_sub(root, "text_encoder")), local_files_only=True)
            text = (tf.T5EncoderModel(tcfg) if tcfg.model_type in ("t5", "mt5", "umt5") else
                    tf.CLIPTextModel(tcfg) if tcfg.model_type.startswith("clip") else tf.AutoModel.from_config(tcfg))
            text = text.to(torch.bfloat16)
            text_dim = getattr(tcfg, "hidden_size", None) or tcfg.d_model
            ids = torch.zeros(1, L, dtype=torch.long)
            frozen_mods.append(("text_encoder", lambda: text(input_ids=ids).last_hidden_state, _params(text)))
        if cfg.encoders.vae:
            from diffusers import AutoencoderKL

            vcfg = Path(cfg.encoders.vae) / "config.json"
            if not vcfg.is_file():
                raise ConfigError(f"config key 'encoders.vae' = {cfg.encoders.vae!r}: no config.json to plan from")
            vae = AutoencoderKL.from_config(json.loads(vcfg.read_text()))
            img = torch.randn(1, 3, cfg.data.image_size, cfg.data.image_size)
            frozen_mods.append(("vae_encoder", lambda: vae.encode(img).latent_dist.mean, _params(vae.encoder)))
        arch, acfg = arch_config(cfg.model, text_dim)
        model = build(arch, acfg, "meta").to(torch.bfloat16)
        m = cfg.model
        inputs = meta_inputs(acfg, m.frames, L, dtype=torch.bfloat16)
        blocks = profile_blocks(model, inputs, "flops", hw)
        frozen = [profile_frozen(n, fn, "flops", hw, params=n_p) for n, fn, n_p in frozen_mods]
        frozen = _with_teacher(cfg, frozen, model, inputs, hw)
        from difftrain.train.stages import STAGES

        if STAGES[cfg.stage].carried(cfg):  # a target network's no-grad forward rides along: twice the rows forward
            blocks = [BlockCost(b.fwd * 2, b.bwd, b.out_bytes * 2, b.saved_bytes, b.params) for b in blocks]
    about = f"{m.name} at model size {m.image_size} from {path}"
    return Profile(blocks, frozen, 1, hw.p2p_bw, hw.latency), cfg.data.batch_size, about, model


def stage_note(path: str, overrides: tuple = ()) -> tuple[str, bool]:
    """A run config's stage as the plan sees it: (a line for the plan, whether it may be pipelined)."""
    from difftrain.config_checks import load_config
    from difftrain.train.stages import STAGES

    cfg = load_config(path, overrides)
    stage = STAGES[cfg.stage]
    if stage.pipeline_refusal:
        return f"stage '{cfg.stage}' cannot be pipelined ({stage.pipeline_refusal}): data-parallel plans only", False
    notes = []
    if hasattr(stage, "teacher_forwards") and "teacher" in stage.roles(cfg):
        notes.append(f"the teacher's {stage.teacher_forwards(cfg)} forwards per sample are frozen work that depends "
                     "only on the batch, the keyed noise and t: prefetched into the bubbles after the encoders, on "
                     "the same samples (one chained frozen module)")
    if stage.carried(cfg):
        notes.append(f"the {stage.carried(cfg)} network's no-grad forward reads live weights: it rides along "
                     "through the segments as extra rows (each block's forward and wire counted twice)")
    return (f"stage '{cfg.stage}': " + "; ".join(notes) if notes else ""), True


def _with_teacher(cfg, frozen: list, model, inputs, hw: Hardware) -> list:
    """A teacher stage's frozen work as the trainer runs it: the encoders, then the teacher's forwards on their
    outputs, one chain (``PipelinedStep.groups``) placed as one module. The teacher has the run's architecture
    (a teacher stage's student starts as its teacher)."""
    from difftrain.train.stages import STAGES

    stage = STAGES[cfg.stage]
    if not hasattr(stage, "teacher_forwards") or "teacher" not in stage.roles(cfg) or stage.pipeline_refusal:
        return frozen
    from difftrain.parallelism.pipeline.segments import cond_keys

    k = stage.teacher_forwards(cfg)
    cond = dict(zip(cond_keys(model), inputs[2:]))
    teacher = profile_frozen("teacher", lambda: [model(inputs[0], inputs[1], cond) for _ in range(k)], "flops", hw,
                             params=_params(model))
    chain = [*frozen, teacher]
    return [FrozenCost("+".join(f.name for f in chain), sum(f.fwd for f in chain), sum(f.out_bytes for f in chain),
                       sum(f.params for f in chain), "first")]


def candidates(profile: Profile, gpus: int, global_batch: int, hw: Hardware, headroom: float = 0.9):
    """Every (S, D, M, mode, engine) the cluster allows, simulated."""
    n = len(profile.blocks)
    out = []
    for S in [s for s in (1, 2, 4, 8, 16, 32) if s <= min(gpus, n) and gpus % s == 0]:
        D = gpus // S
        if global_batch % D:
            continue
        per_replica = global_batch // D
        p2p = hw.p2p_bw if S <= hw.gpus_per_node else hw.net_bw
        dp_bw = hw.net_bw if S * D > hw.gpus_per_node else hw.p2p_bw
        mbs = sorted({m for m in (1, 2, 4, 8, 16, 32, 64) if per_replica % m == 0 and m >= S} | (
            {per_replica} if S > 1 and per_replica >= S else set()))
        if S == 1:
            mbs = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if per_replica % m == 0]
        for M in mbs:
            prof = copy.copy(profile.scaled(per_replica // M))
            prof.p2p_bw = p2p
            ct = [2 * prof.comm(i) for i in range(n - 1)]
            variants = [("1f1b", "inline")] if S == 1 else [("1f1b", m) for m in ("inline", "balanced", "fill")]
            if S > 1 and 2 * S <= n:  # two segments per rank, frozen work inline or balanced
                variants += [(sch, m) for sch in ("interleaved_1f1b", "zero_bubble") for m in ("inline", "balanced")]
            for schedule, mode in variants:
                n_segments = S * (2 if schedule in ("interleaved_1f1b", "zero_bubble") else 1)
                extra = [prof.frozen_time if s == 0 and mode == "inline" else 0.0 for s in range(n_segments)]
                bounds = partition([b.fwd + b.bwd for b in prof.blocks], n_segments, ct, extra)
                for fsdp in ((False, True) if D > 1 else (False,)):
                    r = simulate(prof, bounds, M, schedule, mode, D, dp_bw, fsdp=fsdp)
                    fits = max(m["total"] for m in r.memory) <= headroom * hw.memory
                    out.append(Candidate(S, D, M, mode, fsdp, bounds, r, fits, global_batch / r.time, schedule,
                                         prof, dp_bw))
    return out


def explain(cands: list[Candidate], gpus: int, hw: Hardware, about: str, profile: Profile) -> str:
    fit = [c for c in cands if c.fits]
    lines = [f"plan for {about} on {gpus} x {hw.name} (assumed utilisation {hw.mfu:.0%}, p2p {hw.p2p_bw / 1e9:.0f} "
             f"GB/s, network {hw.net_bw / 1e9:.0f} GB/s per GPU, 16 B per trained parameter)"]
    bb, fz = profile.backbone_time, profile.frozen_time
    lines.append(f"per sample: backbone fwd+bwd {bb * 1e3:.2f} ms, frozen work {fz * 1e3:.2f} ms "
                 f"({', '.join(f'{f.name} {f.fwd * 1e3:.2f} ms' for f in profile.frozen)}; "
                 f"{100 * fz / bb:.0f}% of the backbone); {sum(b.params for b in profile.blocks) / 1e9:.2f}B trained "
                 f"parameters in {len(profile.blocks)} blocks")
    if not fit:
        lines.append("nothing fits: every candidate exceeds 90% of the GPU memory; smallest peak: "
                     + min(cands, key=lambda c: max(m['total'] for m in c.result.memory)).describe())
        return "\n".join(lines)
    best = max(fit, key=lambda c: c.throughput)
    lines.append(f"best: {best.describe()}")
    if best.pp > 1:
        lines.append(f"  segments (blocks): {best.bounds}")
    dp = [c for c in cands if c.pp == 1]
    if dp and not any(c.fits for c in dp):
        m = min(dp, key=lambda c: max(x["total"] for x in c.result.memory))
        lines.append(f"why pipeline: data parallel alone needs {max(x['total'] for x in m.result.memory) / 1e9:.0f} GB "
                     f"per GPU (> {0.9 * hw.memory / 1e9:.0f} GB) even with FSDP and M={m.n_mb}")
    elif dp:
        d = max((c for c in dp if c.fits), key=lambda c: c.throughput)
        lines.append(f"data parallel: {d.describe()} -> best is {best.throughput / d.throughput:.2f}x of it")
    for S in sorted({c.pp for c in fit if c.pp > 1}):
        row = [c for c in fit if c.pp == S]
        by = {mode: max((c for c in row if c.mode == mode and c.schedule == "1f1b"), key=lambda c: c.throughput,
                        default=None) for mode in ("inline", "balanced", "fill")}
        if by["fill"] and by["inline"] and by["balanced"]:
            f = by["fill"]
            lines.append(f"pp={S}: fill {f.throughput / by['inline'].throughput:.2f}x inline, "
                         f"{f.throughput / by['balanced'].throughput:.2f}x balanced; fill hides "
                         f"{_hidden(f):.0%} of the frozen work in bubbles "
                         f"({f.describe()})")
            multi = max((c for c in row if c.schedule != "1f1b"), key=lambda c: c.throughput, default=None)
            if multi is not None:
                lines.append(f"  two segments per rank: {multi.schedule} frozen={multi.mode} is "
                             f"{multi.throughput / f.throughput:.2f}x 1f1b with fill")
    fills = [c for c in fit if c.mode == "fill"]
    if fills:
        lines.append(_partitioned(max(fills, key=lambda c: c.throughput)))
    return "\n".join(lines)


TOLERANCE = 0.02  # the simulated slowdown accepted to hold a frozen module on one rank


def _partitioned(c: Candidate) -> str:
    """The fill plan with the frozen modules partitioned across the pp ranks (``simulate.choose_owners``)."""
    from difftrain.parallelism.pipeline.simulate import choose_owners

    prof = c.profile
    sim = dict(dp=c.dp, dp_bw=c.dp_bw, fsdp=c.fsdp)
    owners = choose_owners(prof, c.bounds, c.n_mb, c.schedule, TOLERANCE, **sim)
    head = f"frozen weights in the best fill plan (pp={c.pp} M={c.n_mb})"
    if all(len(rs) == c.pp for rs in owners.values()):
        return (f"{head}: kept on every rank (holding a module on one rank lowers no rank's peak memory or slows "
                f"the step by more than {TOLERANCE:.0%})")
    part = simulate(prof, c.bounds, c.n_mb, c.schedule, "fill", owners=owners, **sim)
    where = ", ".join(f"{n} on {'every rank' if len(rs) == c.pp else f'rank {min(rs)}'}"
                      for n, rs in owners.items())
    frozen = [f"{m['frozen'] / 1e9:.1f}" for m in part.memory]
    peak = [max(m["total"] for m in r.memory) / 1e9 for r in (c.result, part)]
    return (f"{head}: partitioned ({where}); frozen GB per rank {' '.join(frozen)}; peak memory {peak[1]:.1f} GB "
            f"instead of {peak[0]:.1f} GB, step {part.time / c.result.time:.3f}x")


def _hidden(c: Candidate) -> float:
    """Share of the frozen work the fill placed inside idle gaps (the rest extends the iteration)."""
    frozen = sum(e.end - e.start for e in c.result.events if e.kind == "frozen")
    return max(0.0, 1 - c.result.unplaced / frozen) if frozen else 1.0


def engines_table(profile: Profile, model: torch.nn.Module, gpus: int, global_batch: int, hw: Hardware,
                  headroom: float = 0.9) -> list[str]:
    """Data parallelism over all ``gpus`` with each engine of ``memory.CASES``: the model state one rank holds
    (``memory.predict``: fp32 weights, gradients, AdamW and EMA as difftrain keeps them), plus the simulated
    activations of the fastest micro-batch count that fits, and that candidate's simulated iteration. ZeRO-1/2 move
    DDP's gradient volume and ZeRO-3 FSDP's (Rajbhandari et al. 2020, sec. 7), so they are timed as those; offload
    (host transfers) and tensor parallelism are not simulated (their activations are the data-parallel candidate's)."""
    from difftrain.parallelism.memory import CASES, memory_table, predict, shapes_of

    shapes = shapes_of(model)
    cands = [c for c in candidates(profile, gpus, global_batch, hw) if c.pp == 1]
    budget = headroom * hw.memory
    lines = [f"engines on {gpus} x {hw.name}, data parallel, global batch {global_batch}: model state per rank "
             f"(fp32 weights and gradients, AdamW, EMA) and simulated iteration",
             "| engine | state GB | + activations GB (M) | fits | ms/iter | img/s |", "|---|---|---|---|---|---|"]
    for case in CASES:
        if gpus % case.tp:
            continue
        state = predict(shapes, case, gpus).total
        timed = case.tp == 1 and not case.offload_optimizer
        fsdp = case.engine == "fsdp2" or case.zero_stage == 3
        mine = sorted((c for c in cands if c.fsdp == fsdp or gpus == 1), key=lambda c: -c.throughput)
        fit = [c for c in mine if state + c.result.memory[0]["activations"] <= budget]
        c = fit[0] if fit else min(mine, key=lambda c: c.result.memory[0]["activations"], default=None)
        if c is None:
            continue
        act = c.result.memory[0]["activations"]
        speed = (f"{c.result.time * 1e3:.4g} | {c.throughput:,.0f}" if timed else "not simulated | -")
        lines.append(f"| {case.name} | {state / 1e9:.2f} | {act / 1e9:.2f} (M={c.n_mb}) | "
                     f"{'yes' if fit else 'no'} | {speed} |")
    lines += ["", "model state per rank by kind (memory.predict)", *memory_table(shapes, gpus)]
    return lines


def add_plan_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("config", help=f"a preset ({', '.join(PRESETS)}) or a run config YAML")
    ap.add_argument("overrides", nargs="*", help="the run config's dotted KEY=VALUE overrides (e.g. stage=progressive)")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--hardware", default="h100", choices=sorted(HARDWARE))
    ap.add_argument("--global-batch", type=int, default=0, help="override the preset's / config's global batch")
    ap.add_argument("--timeline", default="", help="write the best plan's simulated iteration as a PNG")
    ap.add_argument("--engines", action="store_true",
                    help="also a table per engine (ddp, fsdp2, ZeRO-1/2/3, offload, tp=2): per-rank bytes of "
                         "parameters, gradients, optimizer state and EMA, and the data-parallel iteration")


def run_plan(a: argparse.Namespace) -> None:
    hw = HARDWARE[a.hardware]
    over = tuple(getattr(a, "overrides", ()) or ())
    profile, batch, about, model = (preset_profile(a.config, hw) if a.config in PRESETS else
                                    config_profile(a.config, hw, over))
    note, pipelined = stage_note(a.config, over) if a.config not in PRESETS else ("", True)
    batch = a.global_batch or batch
    cands = [c for c in candidates(profile, a.gpus, batch, hw) if pipelined or c.pp == 1]
    if note:
        print(note)
    print(explain(cands, a.gpus, hw, about, profile))
    if getattr(a, "engines", False):
        print("\n" + "\n".join(engines_table(profile, model, a.gpus, batch, hw)))
    best = max((c for c in cands if c.fits), key=lambda c: c.throughput, default=None)
    if a.timeline and best is not None:
        from difftrain.parallelism.pipeline.simulate import plot_timeline

        plot_timeline(best.result, a.timeline, best.describe())
        print(f"timeline: {a.timeline}")
