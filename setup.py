from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="difftrain",
    version="0.1.0",
    description="Training large diffusion models on clusters: DiT/UNet, DDP/FSDP2, streaming shards, distillation.",
    packages=find_packages(include=["difftrain", "difftrain.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={"test": ["pytest==9.0.3", "pyarrow==26.0.1", "open_clip_torch==3.3.0"],
                    "parquet": ["pyarrow==26.0.1"], "clip": ["open_clip_torch==3.3.0"],
                    # launching and scaling on clusters (README "Launching on clusters"); OpenMPI itself comes from
                    # the OS packages (openmpi-bin libopenmpi-dev). Never NVIDIA apex from PyPI: the package named
                    # `apex` there is an unrelated project (NVIDIA's is built from source).
                    "cluster": [
                        "mpi4py==4.1.2",  # under mpirun: rank 0 broadcasts its address and a free port (launch/env.py)
                        "deepspeed==0.19.8",  # the deepspeed launcher (hostfile jobs); ZeRO engine: issue 19, to come
                        "megatron-core==0.16.1",  # Megatron tensor-parallel layers, a 2nd TP path (issue 19, to come)
                    ]},
    entry_points={"console_scripts": ["difftrain=difftrain.cli:main"]},
)
