"""Runs inside torchrun (gloo): each rank streams its slice with real worker processes and writes what
it saw. Usage: data_job.py OUT SPEC BATCHES [RESUME_DIR]. Writes OUT/rank{r}.json with the
(epoch, url, key) of every sample per batch, and the loader state before batch BATCHES // 2."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from difftrain.data.loader import ShardLoader


def main():
    out, spec, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ld = ShardLoader(spec, 32, rank, world, num_workers=2, seed=7, shuffle_buffer=8, channels=1, image_size=16)
    if len(sys.argv) > 4:  # resume from every rank's saved state
        ld.load_state_dict([json.loads(f.read_text())["state"] for f in sorted(Path(sys.argv[4]).glob("rank*.json"))])
    seen, state = [], None
    it = iter(ld)
    for g in range(n):
        if g == n // 2:
            state = ld.state_dict()
        b = next(it)
        seen.append([[e, u, k] for e, u, k in zip(b["epochs"].tolist(), b["urls"], b["keys"])])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "state": state}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
