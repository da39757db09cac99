"""PNG plots of evaluation results (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def plot_fid_vs_nfe(rows: list[dict], path: str | Path, title: str = "FID vs NFE",
                    series: Callable[[dict], str] | None = None) -> Path:
    """One line per series (default: per (run, sampler)): FID against denoiser evaluations per sample (log2 axis).
    ``series(row)`` names a row's line (a campaign: stage, kind and sampler); a series of one point (a student at
    its own step count) is drawn as a larger marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series or (lambda r: f"{r['run']} / {r['sampler']}")
    lines: dict[str, list] = {}
    for r in rows:
        lines.setdefault(series(r), []).append((r["nfe"], r["fid"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, pts in lines.items():
        pts.sort()
        one = len(pts) == 1
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if one else "o", markersize=11 if one else 6,
                linestyle="none" if one else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (denoiser evaluations per sample)")
    ax.set_ylabel(f"FID ({rows[0].get('extractor', '?')} features)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
