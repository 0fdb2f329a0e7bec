"""Shared fixtures: the shared trace folder, and a check that no test leaves Flower or torchrun running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = ROOT.parent / "shared" / "traces"
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
        if item.get_closest_marker("gpu") is not None:  # not keywords: they hold the folder name tests/gpu too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"shared traces not found at {SHARED_TRACES}")
    return SHARED_TRACES


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/custom_plugin installed into a private directory (the shared venv stays untouched).

    Put it on PYTHONPATH of the commands a test runs: ``{**os.environ, "PYTHONPATH": str(example_plugin_site)}``.
    """
    base = tmp_path_factory.mktemp("example-plugin")
    target, source = base / "site", base / "src"
    shutil.copytree(ROOT / "examples" / "custom_plugin", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, capture_output=True,
    )
    return target


_SESSION_MARK = "FEDGE_TEST_SESSION"


def _leftover_processes(mark: str) -> list[str]:
    """Flower/torchrun processes started by this test session (they inherit its mark in their environment);
    other sessions running on the same machine are not ours to judge."""
    out = subprocess.run(["pgrep", "-af", _LEFTOVER_PATTERN], capture_output=True, text=True, check=False).stdout
    needle = f"{_SESSION_MARK}={mark}".encode()
    found = []
    for line in out.splitlines():
        pid = line.split(" ", 1)[0]
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone already, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(line)
    return found


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_processes():
    mark = f"{os.getpid()}-{os.urandom(4).hex()}"
    os.environ[_SESSION_MARK] = mark
    yield
    after = _leftover_processes(mark)
    assert not after, f"processes left running after the test session: {after}"
