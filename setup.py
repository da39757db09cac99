from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
    name="difftrain",
    version="0.1.0",
    description="Training large diffusion models on clusters: DiT/UNet, DDP/FSDP2, streaming shards, distillation.",
    packages=find_packages(include=["difftrain", "difftrain.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={"test": ["pytest==9.0.3", "pyarrow==26.0.1", "open_clip_torch==3.3.0"],
                    "parquet": ["pyarrow==26.0.1"], "clip": ["open_clip_torch==3.3.0"]},
    entry_points={"console_scripts": ["difftrain=difftrain.cli:main"]},
)
