"""Pipeline segments cut from DiT (image, video; adaLN-zero and -single), and the UNet (skips across the cut):
chained on one process they equal the whole model's output and gradients, and their parameter names are the
whole model's, partitioned."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from difftrain.config import ModelConfig
from difftrain.models import registry
from difftrain.parallelism.pipeline.segments import cond_keys, make_segment, num_blocks, wire_bytes

TEXT_DIM, LEN, CLASSES = 16, 5, 10

FORMS = {  # id: (ModelConfig kwargs, bounds)
    "dit_text": (dict(name="DiT-T/2", image_size=8, in_channels=4, cond="text"), [(0, 1), (1, 3), (3, 4)]),
    "dit_class": (dict(name="DiT-T/2", image_size=8, in_channels=4, cond="class", num_classes=CLASSES),
                  [(0, 2), (2, 4)]),
    "dit_video": (dict(name="DiT-T/2", image_size=8, in_channels=1, cond="text", frames=4, attention="factorized"),
                  [(0, 2), (2, 3), (3, 4)]),
    "unet_text": (dict(name="UNet-T", image_size=8, in_channels=4, cond="text"), [(0, 1), (1, 2), (2, 4), (4, 5)]),
    "unet_class": (dict(name="UNet-T", image_size=8, in_channels=4, cond="class", num_classes=CLASSES),
                   [(0, 3), (3, 5)]),
}


def _model(kw):
    arch, acfg = registry.arch_config(ModelConfig(**kw), text_dim=TEXT_DIM if kw["cond"] == "text" else 0)
    return registry.materialize(registry.build(arch, acfg), "cpu", seed=0)


def _inputs(model, kw, b=3):
    g = torch.Generator().manual_seed(1)
    shape = (b, kw["frames"], kw["in_channels"], 8, 8) if kw.get("frames") else (b, kw["in_channels"], 8, 8)
    x, t = torch.randn(*shape, generator=g), torch.rand(b, generator=g)
    cond = {}
    if "text_states" in cond_keys(model):
        mask = torch.ones(b, LEN, dtype=torch.bool)
        mask[0, 2:] = False
        cond = {"text_states": torch.randn(b, LEN, TEXT_DIM, generator=g), "text_mask": mask}
    elif "class_labels" in cond_keys(model):
        cond = {"class_labels": torch.tensor([1, 7, CLASSES])[:b]}
    return x, t, cond


@pytest.mark.parametrize("form", sorted(FORMS))
def test_segments_equal_the_whole_model(form):
    kw, bounds = FORMS[form]
    model = _model(kw)
    with torch.no_grad():  # non-zero final layers / gates, so gradients reach every block
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, cond = _inputs(model, kw)
    ref = model(x, t, cond)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert bounds[-1][1] == num_blocks(model)
    segments = [make_segment(copy.deepcopy(model), lo, hi) for lo, hi in bounds]
    for s in segments:
        s.zero_grad(set_to_none=True)
    names = [set(n for n, _ in s.named_parameters()) for s in segments]
    assert set().union(*names) == set(n for n, _ in model.named_parameters())  # every parameter, once
    assert sum(len(n) for n in names) == len(list(model.parameters()))
    for s in segments:  # a segment's state dict is a piece of the whole model's
        whole = model.state_dict()
        assert all(torch.equal(v, whole[k]) for k, v in s.state_dict().items())

    acts = (x, t, *(cond[k] for k in cond_keys(model)))
    sent = []
    for s in segments:
        acts = s(*acts)
        if not s.last:
            sent.append(wire_bytes(acts))
    out = acts
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    grads = {n: p.grad for s in segments for n, p in s.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
    assert all(b > 0 for b in sent)


def test_unet_skips_cross_the_cut():
    """The UNet's wire carries the open skip tensors: the most right after the down blocks, none after the last
    up block's input (DiffusionPipe's cost of cutting a UNet: measured by ``wire_bytes``)."""
    kw = dict(name="UNet-T", image_size=8, in_channels=4, cond="class", num_classes=CLASSES)
    model = _model(kw)
    x, t, cond = _inputs(model, kw)
    n = num_blocks(model)
    sizes = []
    for cut in range(1, n):
        first = make_segment(copy.deepcopy(model), 0, cut)
        sizes.append(len(first(x, t, cond["class_labels"])) - 2)  # skips = wire minus (h, emb)
    levels = model.config.levels
    assert sizes.index(max(sizes)) == levels - 1  # after the last down block (before the mid block)
    assert sizes[-1] == model.config.layers_per_block + 1  # the last up block still pops its skips


def test_bad_bounds_and_models():
    model = _model(FORMS["dit_class"][0])
    with pytest.raises(ValueError, match="out of range"):
        make_segment(model, 2, 9)
    with pytest.raises(TypeError, match="no pipeline segments"):
        make_segment(torch.nn.Linear(2, 2), 0, 1)
