"""Helpers for the CUDA tests: run the real ``fedge`` CLI (torchrun, the worker loop) in a subprocess.

TF32 is switched off in every child (``NVIDIA_TF32_OVERRIDE=0`` reaches cuBLAS and cuDNN alike), so CUDA
float32 stays within float32 rounding of the CPU and parity can be stated as a tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FedgeRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def cuda_env() -> dict[str, str]:
    """The environment of every child: repo root off sys.path, one CPU thread per rank, no TF32."""
    return dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", NVIDIA_TF32_OVERRIDE="0")


@pytest.fixture(scope="session")
def fedge_cli(cuda_env: dict[str, str]) -> FedgeRunner:
    """``fedge_cli(*args, timeout_s=300)``: the ``fedge`` command line in a fresh interpreter."""

    def run(*args: str | Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        code = "import sys; from fedge.cli.app import main; sys.exit(main())"
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, args)],
            env=cuda_env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )

    return run
