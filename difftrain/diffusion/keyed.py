"""Randomness keyed by (seed, step, global sample index, stream).

Each sample's noise, timestep draw and caption-dropout coin come from a generator seeded by a hash of
its key, so a run gives the same numbers whatever the world size, worker count or accumulation split.
"""
from __future__ import annotations

import hashlib

import torch

STREAMS = {"noise": 1, "t": 2, "dropout": 3, "sample": 4, "guidance": 5}


def key_seed(seed: int, step: int, index: int, stream: str) -> int:
    blob = f"{seed}:{step}:{index}:{STREAMS[stream]}".encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _per_sample(fn, seed: int, step: int, indices, stream: str, shape, dtype) -> torch.Tensor:
    g = torch.Generator()
    out = []
    for i in (indices.tolist() if torch.is_tensor(indices) else indices):
        g.manual_seed(key_seed(seed, step, int(i), stream))
        out.append(fn(shape, generator=g, dtype=dtype))
    return torch.stack(out) if out else torch.empty((0, *shape), dtype=dtype)


def keyed_randn(seed: int, step: int, indices, shape, stream: str = "noise", dtype=torch.float32):
    """Standard normal tensor of shape (len(indices), *shape), on the CPU."""
    return _per_sample(torch.randn, seed, step, indices, stream, tuple(shape), dtype)


def keyed_rand(seed: int, step: int, indices, stream: str, dtype=torch.float32):
    """One U[0, 1) draw per index, shape (len(indices),), on the CPU."""
    return _per_sample(torch.rand, seed, step, indices, stream, (), dtype)
