"""PNG plots of evaluation results (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def plot_fid_vs_nfe(rows: list[dict], path: str | Path, title: str = "FID vs NFE") -> Path:
    """One line per (run, sampler): FID against denoiser evaluations per sample (log2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((r["run"], r["sampler"]), []).append((r["nfe"], r["fid"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (run, sampler), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{run} / {sampler}")
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
