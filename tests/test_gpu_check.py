"""benchmarks/gpu_check.sh where there is no GPU: a clear message and a clean exit, nothing run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env}, cwd="/")


def test_without_a_gpu_it_says_so_and_exits_cleanly() -> None:
    done = run({"CUDA_VISIBLE_DEVICES": ""})  # (no CUDA device for torch, on any machine)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU on this machine (")
    assert lines[0].endswith("; nothing to check")
    assert done.stderr == ""


def test_without_the_project_installed_it_fails_saying_what_to_install() -> None:
    done = run({"PYTHON": "false"})
    assert done.returncode == 1
    assert "cannot import torch and synthpipe with false; install the project first" in done.stdout


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing() -> None:
    done = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
