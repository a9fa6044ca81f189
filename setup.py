"""Build script for m2kernels (fused contrastive-loss kernels) and m2model (lean M2-Encoder)."""

from setuptools import find_packages, setup

setup(
    name="m2kernels",
    version="0.1.0",
    description="Fused, chunked, distributed CLIP/ITC loss kernels and a lean bilingual M2-Encoder",
    packages=find_packages(include=["m2kernels", "m2kernels.*", "m2model", "m2model.*", "bench"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "einops", "tqdm"],
    extras_require={
        "dev": ["pytest>=8", "ruff", "triton>=3.0", "matplotlib"],
        "train": ["nvidia-dali-cuda130", "pillow", "webdataset", "matplotlib", "sentencepiece", "pyyaml"],
    },
)
