"""Data loading throughput on CPU: the streaming loader against a plain decode loop over the same bytes.

    python benchmarks/data_throughput.py             # full, a few minutes on 2 idle cores
    python benchmarks/data_throughput.py --quick     # smoke run, about 1 min
    python benchmarks/data_throughput.py --profile   # also: where a worker-free loader spends its time

Everything is built in a temp folder in the same run, and every figure is a ratio against a baseline timed in
the same run, interleaved with it. ``torch.set_num_threads(1)`` in this process, as DataLoader workers run, so
the bound and a worker do the same work on one core.

**Images (256 px).** ``sample_photo_folder`` (random 200-500 px crops of the photos that ship with scikit-learn,
and scikit-image when installed, saved as JPEG at quality 80-95; realistic decode cost, not 16 px digits whose
cost is all overhead) -> ``write_image_shards`` (source bytes kept, 32 a shard).

* *bound*: a plain loop in this process over the same JPEG bytes, pre-loaded in memory (no tar reading, no
  loader): PIL decode, ``convert("RGB")``, ``pil_to_tensor``, torchvision v2 ``resize`` of the short side to
  256 (antialiased), ``center_crop`` 256: uint8 [3, 256, 256], what the loader hands over (images stay uint8
  until the training device, where ``images.to_unit`` maps them to [-1, 1]).
* *loader*: ``ShardLoader.from_config`` with ``data.image_size=256``, batch 32, ``data.num_workers`` 0, 1 and 2
  (the training path: tar reading, streams, the SampleDecoder's checks, the same transform, collate and, with
  workers, the transfer of the uint8 batches to the main process). 0 workers runs the worker's code in this
  process: its gap to the bound is the loader's own per-sample work, the further gap of 1 worker is the
  transfer. After a warm-up batch (worker start-up) each block first takes the batches the workers
  prefetched while the loader was not being timed, untimed, then times ``image_block / 32`` batches.

Blocks run B L0 B L1 B L2 B L0 ... B (B: the bound over ``image_block`` samples, the photos cycled; L: as many
samples from a loader, which cycles through the photos epoch after epoch); each loader block's rate is divided
by the mean of the two bound blocks either side of it, so a linear drift of the machine cancels.
``loader_vs_bound_1w`` = median ratio with 1 worker: the per-worker efficiency (goal >= 0.90).
``scaling_2w`` = median ratio with 2 workers / median ratio with 1 worker. On 2 cores it cannot reach 2: the
main process also needs CPU (it receives every batch and, in training, runs the step), so 2 workers share 2
cores with it.

**Video.** ``write_moving_digits`` clips (16 frames of 32 px H.264), read with ``data.kind=video``
``data.frames=16 data.image_size=32``, batch 16, 1 worker; the bound is ``decode_video`` on the pre-loaded mp4
bytes in this process (B L B ... B as above). ``video_cps`` = loader clips/s, ``video_vs_bound`` = the median
ratio.

**Latent shards.** The photo shards pre-encoded by ``difftrain.data.encode`` in pixel space (``PixelSpace``:
no VAE, so the latent is the 64 px image in [-1, 1], float16 [3, 64, 64]: more values than an SD-VAE latent
of a 256 px image, [4, 32, 32]) and read back with ``data.kind=latent data.image_size=64``, batch 32, 1 worker;
the bound is ``safetensors.torch.load`` of the pre-loaded members. The per-sample work is tiny, so
``latent_vs_bound`` is small and says how much the loader's per-sample overhead weighs;
``latent_vs_image_1w`` = latent samples/s over JPEG-to-256-px samples/s, both with 1 worker: what
pre-encoding buys the data side.

``--profile`` adds where a loader with ``num_workers=0`` (the worker's code in this process) spends its time
(cProfile, by stage and top functions), and the cost of the worker -> main process transfer of a batch of 32
float32 or uint8 [3, 256, 256] tensors (a worker that only stacks pre-made tensors; timed, not profiled).

Progress goes to stderr; stdout gets the tables and, last, one line of ``key=value`` figures.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


@dataclasses.dataclass
class Plan:
    photos: int  # distinct photos (the loader cycles through them epoch after epoch)
    image_block: int  # samples per timed block, bound and loader alike (a multiple of BATCH)
    clips: int  # distinct moving-digit clips
    video_block: int  # clips per timed block (a multiple of VIDEO_BATCH)
    latent_block: int  # latent samples per timed block (a multiple of BATCH)
    rounds: int  # images: B L1 B L2 per round; video, latents: B L per round; then a last B


PLANS = {"full": Plan(photos=384, image_block=1536, clips=128, video_block=384, latent_block=8192, rounds=6),
         "quick": Plan(photos=128, image_block=512, clips=64, video_block=128, latent_block=2048, rounds=3)}
BATCH, VIDEO_BATCH = 32, 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(xs) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------ data
def members(spec: str, ext: str) -> list[bytes]:
    """Every ``ext`` member of the shards, in shard order: what the bounds decode."""
    from difftrain.data import tario
    from difftrain.data.spec import parse_spec

    return [raw[ext] for src in parse_spec(spec) for url in src.urls for raw, _ in tario.read_shard(url)]


def make_data(tmp: Path, plan: Plan) -> dict:
    from difftrain.config_checks import load_config
    from difftrain.data.encode import encode
    from difftrain.data.moving_digits import write_moving_digits
    from difftrain.data.writers import sample_photo_folder, write_image_shards
    from difftrain.models.encoders import PixelSpace

    t = time.perf_counter()
    photos = sample_photo_folder(tmp / "photos", n=plan.photos, size_range=(200, 500), seed=0)
    images = write_image_shards(photos, tmp / "photo_shards", shard_size=32, progress=False)
    video = write_moving_digits(tmp / "video", n_train=plan.clips, n_val=0, shard_size=32, frames=16, size=32,
                                progress=False)
    cfg = load_config(None, ["data.image_size=64"])
    cfg.data.train = images["spec"]
    with contextlib.redirect_stdout(sys.stderr):  # encode prints its summary
        res = encode(cfg, tmp / "latent", None, PixelSpace(3), dtype="float16", batch_size=32, progress=False)
    latent_spec = f"{tmp / 'latent'}/{{00000..{res['shards'] - 1:05d}}}.tar"
    data = {"image_spec": images["spec"], "jpgs": members(images["spec"], "jpg"),
            "video_spec": video["train"], "mp4s": members(video["train"], "mp4"),
            "latent_spec": latent_spec, "safetensors": members(latent_spec, "safetensors")}
    sizes = [image_size_of(b) for b in data["jpgs"]]
    log(f"data: {len(data['jpgs'])} photos ({min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px, "
        f"{sum(map(len, data['jpgs'])) / len(data['jpgs']) / 1e3:.0f} kB JPEG on average), "
        f"{len(data['mp4s'])} clips ({video['codec']}), {len(data['safetensors'])} latents "
        f"in {time.perf_counter() - t:.1f} s")
    return data


def image_size_of(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


# ------------------------------------------------------------------------------------------------ bounds
def image_bound(data: bytes, size: int = 256) -> torch.Tensor:
    """The plain decode + resize of one JPEG: uint8 [3, size, size]."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    img = Image.open(io.BytesIO(data)).convert("RGB")
    x = TF.pil_to_tensor(img)  # uint8 [3, h, w]
    return TF.center_crop(TF.resize(x, size, antialias=True), [size, size])  # short side -> size, then crop


def video_bound(data: bytes) -> torch.Tensor:
    from difftrain.data.video import decode_video

    return decode_video(data, frames=16, size=32)


def latent_bound(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def time_bound(fn, items: list[bytes]) -> float:
    """Samples per second of ``fn`` over ``items`` once."""
    t = time.perf_counter()
    for b in items:
        fn(b)
    return len(items) / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------ loader
class LoaderTimer:
    """A live ShardLoader iterator; ``block(k)`` takes the batches prefetched while it was idle (untimed),
    then returns samples/s over the next ``k`` batches."""

    def __init__(self, spec: str, workers: int, batch: int, **data):
        from difftrain.config import DataConfig
        from difftrain.data.loader import ShardLoader

        d = DataConfig(train=spec, batch_size=batch, num_workers=workers, **data)
        self.ld = ShardLoader.from_config(d, rank=0, world=1, seed=0)
        self.workers, self.batch = workers, batch
        self.it = iter(self.ld)
        next(self.it)  # warm-up: worker start-up, imports, first batch

    def block(self, k: int) -> float:
        for _ in range(self.ld.prefetch_factor * self.workers):  # made while the bound ran: not timed
            next(self.it)
        t, n = time.perf_counter(), 0
        for _ in range(k):
            n += len(next(self.it)["keys"])
        return n / (time.perf_counter() - t)

    def close(self) -> None:
        self.it.close()


def interleave(name: str, bound, loaders: dict[str, LoaderTimer], k: int, rounds: int) -> dict:
    """B L B L ... B over ``rounds`` x each loader; returns the bound rates and, per loader, its rates and
    ratios to the mean of the bound blocks either side."""
    b = [bound()]
    out = {key: {"sps": [], "ratio": []} for key in loaders}
    for r in range(rounds):
        for key, lt in loaders.items():
            rate = lt.block(k)
            b.append(bound())
            out[key]["sps"].append(rate)
            out[key]["ratio"].append(rate / ((b[-2] + b[-1]) / 2))
            log(f"{name} round {r + 1}/{rounds}: {key} {rate:.1f}/s, bound {b[-1]:.1f}/s, "
                f"ratio {out[key]['ratio'][-1]:.3f}")
    return {"bound": b, **out}


# ------------------------------------------------------------------------------------------------ profile
def _cum(st: pstats.Stats, file: str, func: str) -> float:
    """Cumulative seconds of the function ``func`` defined in a file named ``file`` (0 if never called)."""
    return sum(v[3] for (f, _, fn), v in st.stats.items() if fn == func and Path(f).name == file)


def profile_loader(data: dict, batches: int) -> str:
    """Where a worker-free loader's time goes (cProfile), and what the worker -> main transfer of a batch costs
    (timed, no profiler)."""
    from difftrain.config import DataConfig
    from difftrain.data.loader import ShardLoader

    d = DataConfig(train=data["image_spec"], batch_size=BATCH, num_workers=0, image_size=256)

    def run_loader():
        it = iter(ShardLoader.from_config(d, rank=0, world=1, seed=0))
        for _ in range(batches):
            next(it)
        it.close()

    run_loader()  # warm: imports, first calls
    prof = cProfile.Profile()
    prof.enable()
    run_loader()
    prof.disable()
    st = pstats.Stats(prof)
    total, n = st.total_tt, batches * BATCH
    stages = {"tar reading (tario.read_shard: tarfile, 3 members + 3 pax headers a sample)":
              _cum(st, "tario.py", "read_shard"),
              "decode + checks + transform (SampleDecoder: the bound's work)": _cum(st, "samples.py", "__call__"),
              "collate (torch.stack of the tensors)": _cum(st, "loader.py", "collate")}
    stages["rest (streams, states, batching)"] = total - sum(stages.values())
    lines = [f"\nWhere a loader with num_workers=0 spends its time: {batches} batches of {BATCH} at 256 px, cProfile "
             f"cumulative times (the profiler inflates Python-heavy stages such as tar reading)\n",
             "| stage | s | % | us per sample |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {100 * v / total:.1f} | {1e6 * v / n:.0f} |" for k, v in stages.items()]
    lines += [f"| total | {total:.3f} | 100 | {1e6 * total / n:.0f} |", "",
              f"Worker -> main process transfer, timed without the profiler: 1 worker yields a stack of {BATCH} "
              f"pre-made [3, 256, 256] tensors (no decoding)\n", "| dtype | us per sample (stack + transfer) |",
              "|---|---|"]
    lines += [f"| {dtype} | {transfer_cost(dtype):.0f} |" for dtype in ("float32", "uint8")]
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]
    lines += ["", "Top own times of the same profile\n", "| own s | own % | calls | function |", "|---|---|---|---|"]
    for (file, line, func), (_, nc, tt, _, _) in rows:
        where = f"{Path(file).name}:{line}({func})" if line else func
        lines.append(f"| {tt:.3f} | {100 * tt / total:.1f} | {nc} | `{where}` |")
    return "\n".join(lines)


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, dtype: str):
        self.dtype = getattr(torch, dtype)

    def __iter__(self):
        xs = [torch.full((3, 256, 256), i, dtype=self.dtype) for i in range(BATCH)]
        while True:
            yield {"pixels": torch.stack(xs)}


def transfer_cost(dtype: str, batches: int = 24) -> float:
    """Microseconds per sample to stack a batch in a worker and hand it to this process."""
    from torch.utils.data import DataLoader

    it = iter(DataLoader(_Batches(dtype), batch_size=None, num_workers=1, prefetch_factor=2))
    for _ in range(3):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    del it
    return 1e6 * dt / (batches * BATCH)


# ------------------------------------------------------------------------------------------------ main
def cycle(items: list, n: int) -> list:
    return (items * (n // len(items) + 1))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min): fewer photos, smaller blocks")
    ap.add_argument("--profile", action="store_true", help="add cProfile tables of the bound and a 0-worker loader")
    args = ap.parse_args()
    torch.set_num_threads(1)
    plan = PLANS["quick" if args.quick else "full"]
    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="difftrain_data_bench_") as tmp:
        data = make_data(Path(tmp), plan)
        jpgs = cycle(data["jpgs"], plan.image_block)
        mp4s = cycle(data["mp4s"], plan.video_block)
        sts = cycle(data["safetensors"], plan.latent_block)

        time_bound(image_bound, jpgs[:16])  # warm-up: imports, first calls
        log("images: starting loaders (0, 1 and 2 workers)")
        loaders = {f"{n}w": LoaderTimer(data["image_spec"], n, BATCH, image_size=256) for n in (0, 1, 2)}
        try:
            img = interleave("images", lambda: time_bound(image_bound, jpgs), loaders,
                             plan.image_block // BATCH, plan.rounds)
        finally:
            for lt in loaders.values():
                lt.close()

        time_bound(video_bound, mp4s[:4])
        vid_loader = LoaderTimer(data["video_spec"], 1, VIDEO_BATCH, kind="video", frames=16, image_size=32)
        try:
            vid = interleave("video", lambda: time_bound(video_bound, mp4s), {"1w": vid_loader},
                             plan.video_block // VIDEO_BATCH, plan.rounds)
        finally:
            vid_loader.close()

        lat_loader = LoaderTimer(data["latent_spec"], 1, BATCH, kind="latent", image_size=64)
        try:
            lat = interleave("latent", lambda: time_bound(latent_bound, sts), {"1w": lat_loader},
                             plan.latent_block // BATCH, plan.rounds)
        finally:
            lat_loader.close()
        prof = profile_loader(data, batches=plan.image_block // BATCH // 2) if args.profile else ""

    # ------------------------------------------------------------------ report
    def row(what: str, sps: list[float], ratio: list[float] | None) -> str:
        r = "1" if ratio is None else f"{med(ratio):.3f} ({min(ratio):.3f}..{max(ratio):.3f})"
        return f"| {what} | {med(sps):.1f} | {r} |"

    r1, r2 = med(img["1w"]["ratio"]), med(img["2w"]["ratio"])
    image_1w, latent_1w = med(img["1w"]["sps"]), med(lat["1w"]["sps"])
    print(f"torch {torch.__version__}, 1 thread in this process, {os.cpu_count()} CPUs, load average at start "
          f"{load:.2f}, {'quick' if args.quick else 'full'} run")
    print(f"\nImages: {len(data['jpgs'])} photos (JPEG, 200-500 px) to 256 px, batch {BATCH}, blocks of "
          f"{plan.image_block} samples; samples/s: median over blocks; ratio: to the bound blocks either side "
          f"(median, min..max)\n")
    print("| pipeline | samples/s | vs bound |\n|---|---|---|")
    print(row("bound: pre-loaded JPEG bytes, PIL decode + RGB + resize + crop (uint8), 1 process", img["bound"], None))
    print(row("ShardLoader, 0 workers (the worker's code in this process; no transfer)", img["0w"]["sps"],
              img["0w"]["ratio"]))
    print(row("ShardLoader, 1 worker", img["1w"]["sps"], img["1w"]["ratio"]))
    print(row("ShardLoader, 2 workers", img["2w"]["sps"], img["2w"]["ratio"]))
    print(f"\nscaling 1 -> 2 workers: {r2 / r1:.2f}x (2 workers and the main process share {os.cpu_count()} cores: "
          f"< 2 expected there)")
    print(f"\nVideo: {len(data['mp4s'])} moving-digit clips, 16 frames to 32 px, batch {VIDEO_BATCH}, blocks of "
          f"{plan.video_block} clips\n")
    print("| pipeline | clips/s | vs bound |\n|---|---|---|")
    print(row("bound: decode_video on pre-loaded mp4 bytes, 1 process", vid["bound"], None))
    print(row("ShardLoader data.kind=video, 1 worker", vid["1w"]["sps"], vid["1w"]["ratio"]))
    print(f"\nLatent shards: the {len(data['jpgs'])} photos pre-encoded in pixel space at 64 px (float16 [3, 64, 64]), "
          f"batch {BATCH}, blocks of {plan.latent_block} samples\n")
    print("| pipeline | samples/s | vs bound |\n|---|---|---|")
    print(row("bound: safetensors load of pre-loaded members, 1 process", lat["bound"], None))
    print(row("ShardLoader data.kind=latent, 1 worker", lat["1w"]["sps"], lat["1w"]["ratio"]))
    print(f"\nlatent shards vs JPEG decoding, loader with 1 worker: {latent_1w / image_1w:.1f}x the samples/s")
    if prof:
        print(prof)
    figures = {"loader_vs_bound_1w": f"{r1:.3f}", "loader_vs_bound_2w": f"{r2:.3f}", "scaling_2w": f"{r2 / r1:.2f}",
               "loader_vs_bound_0w": f"{med(img['0w']['ratio']):.3f}",
               "image_sps_1w": f"{image_1w:.1f}", "image_sps_2w": f"{med(img['2w']['sps']):.1f}",
               "image_bound_sps": f"{med(img['bound']):.1f}",
               "video_cps": f"{med(vid['1w']['sps']):.1f}", "video_vs_bound": f"{med(vid['1w']['ratio']):.3f}",
               "latent_sps": f"{latent_1w:.1f}", "latent_vs_bound": f"{med(lat['1w']['ratio']):.3f}",
               "latent_vs_image_1w": f"{latent_1w / image_1w:.1f}",
               "load_avg_start": f"{load:.2f}", "wall_s": f"{time.perf_counter() - t_start:.0f}"}
    print()
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
