"""What a pipeline cut carries: bytes per sample sent between segments, at every cut of a UNet and a DiT.

    python benchmarks/wire_bytes.py        # seconds; meta device, no weights

UNet-S and DiT-B/2, text-conditional (77 x 768 states), 32 x 32 x 4 latents, fp32. For each cut (the segment
boundary before block i), ``segments.wire_bytes`` of the one-block segment's outputs: the UNet carries its open skip
tensors with the activation, the DiT its t-embedding and projected text. Printed next to the activation alone.
Ends with one ``key=value`` line (the largest ratio per model).
"""
from __future__ import annotations

import copy

import torch

from difftrain.config import ModelConfig
from difftrain.models import registry
from difftrain.parallelism.pipeline.segments import make_segment, num_blocks, wire_bytes


def cuts(name: str, size: int = 32, ch: int = 4, text_len: int = 77, text_dim: int = 768):
    arch, acfg = registry.arch_config(ModelConfig(name=name, image_size=size, in_channels=ch, cond="text"),
                                      text_dim=text_dim)
    with torch.device("meta"):
        model = registry.build(arch, acfg)
        args = (torch.randn(1, ch, size, size), torch.rand(1), torch.randn(1, text_len, text_dim),
                torch.ones(1, text_len, dtype=torch.bool))
    rows = []
    for i in range(num_blocks(model) - 1):
        out = make_segment(copy.deepcopy(model), i, i + 1)(*args)
        rows.append((i + 1, wire_bytes(out), out[0].numel() * out[0].element_size()))
        args = out
    return rows


def main() -> None:
    figures = {}
    print("| model | cut before block | wire KiB / sample | activation alone KiB | ratio |")
    print("|---|---|---|---|---|")
    for name in ("UNet-S", "DiT-B/2"):
        rows = cuts(name)
        for cut, wire, act in rows:
            print(f"| {name} | {cut} | {wire / 1024:.0f} | {act / 1024:.0f} | {wire / act:.1f} |")
        key = name.replace("-", "_").replace("/", "_").lower()
        figures[f"max_ratio_{key}"] = round(max(w / a for _, w, a in rows), 1)
        figures[f"max_wire_kib_{key}"] = round(max(w for _, w, _ in rows) / 1024)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
