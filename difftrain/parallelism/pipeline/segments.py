"""Pipeline segments cut from our backbones at block boundaries: the trainable part DiffusionPipe pipelines.

``make_segment(model, lo, hi)`` keeps trunk blocks ``lo .. hi-1`` of a DiT (image or video) or of the UNet wrapper,
plus the embeddings on the first segment and the output head on the last, and drops every other submodule (set
to ``None``), so the segment's parameter names (FQNs) are the full model's: a pipelined checkpoint is the union of
the segments' state dicts and loads into the whole model, and back (DCP reshards by name).

A segment is an ``nn.Module`` whose ``forward`` takes and returns positional tensors only, the contract of
``torch.distributed.pipelining.PipelineStage`` (which runs it):

* first segment: ``(x_t, t, *cond)`` with ``cond`` in ``cond_keys(model)`` order (``class_labels`` or
  ``text_states, text_mask``; then ``guidance`` for a model with ``guidance_embed``);
* between segments ("the wire"): everything the remaining blocks need, computed once on the first segment so
  every segment gets it (DiffusionPipe, Tian et al. 2024, sec. 3: segments need the conditioning of every block):
  DiT: ``(x, c[, mod][, text, text_keep])`` — tokens, the t(+class) embedding, adaLN-single's shared
  projection, the projected caption and its keep-mask as float (1 = attend); the UNet:
  ``(h, emb[, context, context_bias], *skips)`` — the open skip tensors travel with the activation;
* last segment: the prediction ``[B, C, H, W]`` (``[B, T, C, H, W]`` for video).

Gradients of the wire's float tensors flow back to the first segment (the embeddings are trained once, where they
live). The image size is fixed per segment (``grid``): a pipeline schedule's p2p buffers have fixed shapes anyway.
"""
from __future__ import annotations

import torch
from torch import nn

from difftrain.models.dit import DiT
from difftrain.models.unet import UNet


def cond_keys(model: nn.Module) -> tuple[str, ...]:
    """The conditioning tensors the first segment takes after ``(x_t, t)``, in order."""
    cfg = model.config
    keys = ()
    if getattr(cfg, "num_classes", 0) > 0:
        keys = ("class_labels",)
    elif getattr(cfg, "text_dim", 0) > 0:
        keys = ("text_states", "text_mask")
    return keys + (("guidance",) if getattr(cfg, "guidance_embed", False) else ())


def num_blocks(model: nn.Module) -> int:
    return len(model.blocks)


class _Segment(nn.Module):
    """Registers the kept children of ``model`` under their own names (so FQNs match the full model) and keeps
    ``model`` itself unregistered, for its ``embed`` / ``final`` / ``stem`` / ``head`` methods."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        super().__init__()
        n = num_blocks(model)
        if not 0 <= lo < hi <= n:
            raise ValueError(f"segment blocks [{lo}, {hi}) out of range for a trunk of {n} blocks")
        self.lo, self.hi, self.first, self.last = lo, hi, lo == 0, hi == n
        object.__setattr__(self, "model", model)
        for name, child in model.named_children():
            setattr(self, name, child)
        # timestep-aware activation quantisation (quant/qat.py) reads t in every segment: t rides on the wire
        self.clock = getattr(model, "quant_clock", None)

    def time_in(self, args: tuple) -> tuple:
        """Set the quantisers' clock from the first segment's t or the wire's last tensor (removed)."""
        if self.clock is None:
            return args
        if self.first:
            self.clock.t = args[1].detach()
            return args
        self.clock.t = args[-1].detach()
        return args[:-1]

    def time_out(self, wire: tuple) -> tuple:
        return wire + (self.clock.t.to(wire[0].device, torch.float32).expand(wire[0].shape[0]).contiguous(),) \
            if self.clock is not None else wire


class DiTSegment(_Segment):
    def __init__(self, model: DiT, lo: int, hi: int):
        super().__init__(model, lo, hi)
        for i in range(num_blocks(model)):
            if not lo <= i < hi:
                model.blocks[i] = None
        if not self.first:
            for name in ("patch_embed", "t_embed", "y_embed", "text_embed", "t_block", "g_embed"):
                setattr(model, name, None)
                setattr(self, name, None)
        if not self.last:
            model.final_layer = self.final_layer = None
        cfg = model.config
        self.single = cfg.mod_type == "single"
        self.text = cfg.text_dim > 0
        self.grid = (cfg.image_size, cfg.image_size)

    def forward(self, *args: torch.Tensor):
        m = self.model
        args = self.time_in(args)
        if self.first:
            x_t, t, *cond = args
            x, c, mod, text, mask = m.embed(x_t, t, dict(zip(cond_keys(m), cond)))
        else:
            x, c, *rest = args
            mod = rest.pop(0) if self.single else c
            text, keep = rest if self.text else (None, None)
            mask = keep > 0.5 if self.text else None
        for i in range(self.lo, self.hi):
            x = m.blocks[i](x, mod, text, mask)
        if self.last:
            return m.final(x, c, self.grid)
        wire = (x, c) + ((mod,) if self.single else ()) + ((text, mask.to(x.dtype)) if self.text else ())
        return _contiguous(self.time_out(wire))


class UNetSegment(_Segment):
    def __init__(self, model: UNet, lo: int, hi: int):
        super().__init__(model, lo, hi)
        for i in range(num_blocks(model)):
            if not lo <= i < hi:
                model.replace_block(i, None)
        inner = model.inner
        if not self.first:
            for name in ("conv_in", "time_embedding", "class_embedding"):
                if hasattr(inner, name):
                    setattr(inner, name, None)
        if not self.last:
            for name in ("conv_norm_out", "conv_out"):
                setattr(inner, name, None)
        self.text = model.text

    def forward(self, *args: torch.Tensor):
        m = self.model
        args = self.time_in(args)
        if self.first:
            x_t, t, *cond = args
            state = m.stem(x_t, t, dict(zip(cond_keys(m), cond)))
        else:
            h, emb, *rest = args
            state = {"h": _ContiguousGrad.apply(h), "emb": emb}
            if self.text:
                state["context"], state["context_bias"] = rest[0], rest[1]
                rest = rest[2:]
            state["skips"] = tuple(_ContiguousGrad.apply(s) for s in rest)
            received = {id(w): r for w, r in zip(state["skips"], rest)}
        for i in range(self.lo, self.hi):
            state = m.run_block(i, state)
        if not self.first:  # skips that only pass through leave as they came (not as the wrapper's views)
            state["skips"] = tuple(received.get(id(s), s) for s in state["skips"])
        if self.last:
            return m.head(state)
        ctx = (state["context"], state["context_bias"]) if self.text else ()
        return _contiguous(self.time_out((state["h"], state["emb"], *ctx, *state["skips"])))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient a fresh contiguous tensor: the gradient a UNet segment sends
    upstream for a received activation or skip is a channel slice of its concatenation's gradient, and p2p
    (gloo) buffers must be contiguous. Only on consumed tensors: pass-through outputs must not be views (the
    zero-bubble backward detaches segment outputs in place)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        # a fresh tensor whenever g is a view: the runtime detaches received-input gradients in place
        return g if g.is_contiguous() and g._base is None else g.clone(memory_format=torch.contiguous_format)


def _contiguous(wire: tuple) -> tuple:
    """p2p sends (gloo) need contiguous tensors; views such as a transposed tensor are copied once here."""
    return tuple(w.contiguous() for w in wire)


def make_segment(model: nn.Module, lo: int, hi: int) -> _Segment:
    """The pipeline segment owning trunk blocks ``lo .. hi-1`` of ``model`` (modified in place: every other block
    and, off the first/last segment, the embeddings/head are dropped). ``model`` may be materialised or on the
    meta device; only the segment's modules stay referenced."""
    if isinstance(model, DiT):
        return DiTSegment(model, lo, hi)
    if isinstance(model, UNet):
        return UNetSegment(model, lo, hi)
    raise TypeError(f"no pipeline segments for {type(model).__name__}: DiT, VideoDiT and UNet can be cut")


def wire_bytes(outputs) -> int:
    """Bytes a segment sends downstream per micro-batch (what crossing a boundary costs: the UNet's skips)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(o.numel() * o.element_size() for o in outputs)
