"""Shared fixtures: the shared trace folder, and a check that no test leaves Flower or torchrun running."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
_LEFTOVER_PATTERN = "flower-superlink|flower-supernode|flower-superexec|flwr-serverapp|flwr-clientapp|torchrun|torch.distributed.run"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"shared traces not found at {SHARED_TRACES}")
    return SHARED_TRACES


def _leftover_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", _LEFTOVER_PATTERN], capture_output=True, text=True).stdout
    me = str(os.getpid())
    return [line for line in out.splitlines() if line and not line.startswith(me + " ") and "pgrep" not in line]


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_processes():
    before = set(_leftover_processes())
    yield
    after = [p for p in _leftover_processes() if p not in before]
    assert not after, f"processes left running after the test session: {after}"
