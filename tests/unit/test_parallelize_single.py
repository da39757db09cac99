"""Single-process parallelize pieces: activation checkpointing and per-block compile change nothing but speed/memory."""
from __future__ import annotations

import copy

import pytest
import torch

from difftrain.config import ModelConfig
from difftrain.models import registry
from difftrain.models.dit import DiTConfig
from difftrain.parallelism.parallelize import apply_activation_checkpointing, apply_compile

pytest.importorskip("diffusers")

TEXT_DIM = 12


def build(kind: str):
    if kind.startswith("dit"):
        cond = dict(num_classes=10, text_dim=0) if kind == "dit-class" else dict(num_classes=0, text_dim=TEXT_DIM)
        arch, cfg = "dit", DiTConfig(image_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2,
                                     num_heads=2, **cond)
    else:
        mcfg = ModelConfig(name="UNet-T", image_size=16, in_channels=1, cond=kind.split("-")[1], num_classes=10)
        arch, cfg = registry.arch_config(mcfg, text_dim=TEXT_DIM)
    model = registry.materialize(registry.build(arch, cfg), "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off DiT's zero-init so every gradient is non-trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batch(kind: str, b: int = 2):
    g = torch.Generator().manual_seed(2)
    x, t, target = torch.randn(b, 1, 16, 16, generator=g), torch.rand(b, generator=g), torch.randn(b, 1, 16, 16,
                                                                                                 generator=g)
    if kind.endswith("class"):
        return x, t, {"class_labels": torch.tensor([3, 10])[:b]}, target  # 10 = the null label
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, {"text_states": torch.randn(b, 5, TEXT_DIM, generator=g), "text_mask": mask}, target


def run(model, kind: str):
    """(output, loss, gradients) of one training step's forward and backward."""
    x, t, cond, target = batch(kind)
    model.zero_grad(set_to_none=True)
    out = model(x, t, cond)
    loss = (out - target).square().mean()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_tensor_count(model, kind: str) -> int:
    """Tensors kept for backward by one forward pass (checkpointed blocks keep only their inputs)."""
    n = 0

    def pack(t):
        nonlocal n
        n += 1
        return t

    x, t, cond, _ = batch(kind)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, cond).sum()
    return n


def assert_close(a, b, tol):
    (oa, la, ga), (ob, lb, gb) = a, b
    assert (oa - ob).abs().max().item() <= tol
    assert (la - lb).abs().item() <= tol
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] - gb[k]).abs().max().item() <= tol, k
    assert sum(int(g.abs().sum() > 0) for g in ga.values()) > 0.9 * len(ga)  # not a trivially zero comparison


KINDS = ["dit-class", "dit-text", "unet-class", "unet-text"]


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_is_exact(kind):
    ref = build(kind)
    model = copy.deepcopy(ref)
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    apply_activation_checkpointing(model)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert saved_tensor_count(model, kind) < saved_tensor_count(ref, kind)  # it really checkpoints
    assert_close(run(model, kind), run(ref, kind), 1e-6)


# compiling the UNet's five block types costs ~10 s on CPU, so its text form (same blocks + cross-attention) is
# left to the activation-checkpointing test above
@pytest.mark.parametrize("kind", ["dit-class", "dit-text", "unet-class"])
@pytest.mark.parametrize("with_ac", [False, True], ids=["compile", "ac+compile"])
def test_compile_matches_eager(kind, with_ac):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    ref = build(kind)
    model = copy.deepcopy(ref)
    names = [n for n, _ in model.named_parameters()]
    if with_ac:
        apply_activation_checkpointing(model)
    backend = CompileCounterWithBackend("aot_eager")
    apply_compile(model, backend)
    assert [n for n, _ in model.named_parameters()] == names
    assert_close(run(model, kind), run(ref, kind), 1e-5)
    assert backend.frame_count >= 1  # the blocks really ran compiled (a checkpoint must not hide them from Dynamo)
