"""ParallelDims: the job's split into pipeline, data-parallel (replicate x shard) and tensor dims.

Validated up front, turned into one named DeviceMesh, and passed explicitly to whatever needs it
(no module-level process-group globals). Mesh dims are ordered pp, dp_replicate, dp_shard, tp.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from difftrain.config import ConfigError, ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, pcfg: ParallelConfig, world_size: int) -> "ParallelDims":
        rep, shard = pcfg.dp_replicate, pcfg.dp_shard
        if pcfg.engine == "ddp" and shard == -1:
            shard = 1
        if rep == -1 and shard == -1:  # fsdp2 default: shard over every data-parallel rank
            rep = 1
        if -1 in (rep, shard):
            fixed = (shard if rep == -1 else rep) * pcfg.tp * pcfg.pp
            key = "dp_replicate" if rep == -1 else "dp_shard"
            if fixed <= 0 or world_size % fixed:
                raise ConfigError(f"cannot infer parallel.{key}: the other dimensions ({fixed}) "
                                  f"do not divide the world size {world_size}")
            rep, shard = (world_size // fixed, shard) if rep == -1 else (rep, world_size // fixed)
        dims = cls(rep, shard, pcfg.tp, pcfg.pp, world_size)
        dims.validate(pcfg.engine)
        return dims

    def validate(self, engine: str) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'parallel.{name}' must be >= 1 (or -1: inferred)")
        prod = self.dp_replicate * self.dp_shard * self.tp * self.pp
        if prod != self.world_size:
            raise ConfigError(
                f"parallel.dp_replicate*dp_shard*tp*pp = {self.dp_replicate}*{self.dp_shard}*{self.tp}*{self.pp}"
                f" = {prod} != world size {self.world_size}")
        if engine == "ddp" and self.dp_shard != 1:
            raise ConfigError("config key 'parallel.dp_shard' must be 1 with parallel.engine=ddp (use fsdp2 to shard)")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(
            device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=MESH_DIMS)


@dataclass
class Meshes:
    """The world mesh plus the sub-meshes engines use."""
    dims: ParallelDims
    world: DeviceMesh

    @cached_property
    def dp(self) -> DeviceMesh:
        """All data-parallel ranks as one flat dimension (DDP, loss/metric reductions)."""
        return self.world["dp_replicate", "dp_shard"]._flatten("dp")

    @cached_property
    def fsdp(self) -> DeviceMesh:
        """1-D (dp_shard) for FSDP, 2-D (dp_replicate, dp_shard) for HSDP."""
        if self.dims.dp_replicate > 1:
            return self.world["dp_replicate", "dp_shard"]
        return self.world["dp_shard"]

    @cached_property
    def tp(self) -> DeviceMesh:
        """The tensor-parallel ranks of this rank's data-parallel and pipeline slice (they read the same batch)."""
        return self.world["tp"]

    @cached_property
    def pp(self) -> DeviceMesh:
        """The pipeline ranks of this rank's data-parallel slice."""
        return self.world["pp"]

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()
