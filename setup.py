"""Packaging for synthpipe: pipeline-parallel training with synthetic gradients (DNI).

The version is read from ``synthpipe/_version.py`` as text, so installing does not
import the package (and therefore does not need torch to be importable yet).
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    path = os.path.join(HERE, "synthpipe", "_version.py")
    with open(path, encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    if not match:
        raise RuntimeError(f"no __version__ found in {path}")
    return match.group(1)


def read_readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="synthpipe",
    version=read_version(),
    description="Pipeline-parallel training with synthetic gradients (Decoupled Neural Interfaces) in PyTorch",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    # synthpipe, synthpipe.stages, synthpipe.engine, synthpipe.launch, synthpipe.benchmark
    packages=find_packages(include=["synthpipe", "synthpipe.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "psutil",
        "nvidia-ml-py",
        "tqdm",
        "mnist1d",
        "matplotlib",
    ],
    extras_require={
        # TensorBoard scalars (Trainer(log_dir=...), synthpipe train --tensorboard)
        "tensorboard": ["tensorboard"],
        # Hugging Face models (split by tracing; tests/test_hf.py builds small ones from configs)
        "hf": ["transformers>=5"],
        # (the TensorBoard and Hugging Face tests run in CI)
        "dev": ["pytest", "pytest-timeout", "ruff", "mypy", "pdoc", "tensorboard", "transformers>=5"],
    },
    entry_points={
        "console_scripts": ["synthpipe=synthpipe.launch.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
