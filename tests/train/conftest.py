"""Helpers for cluster-training tests: run the real worker loop on W forked gloo processes, and the
single-process reference every strategy must match."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TINY = {"model": "mlp", "model_options": {"hidden": [32, 16]}, "dataset": "digits", "batch_size": 24, "seed": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_run(path: Path, **settings: Any) -> Path:
    """A run directory holding config.toml for the worker, as ``fedge train`` writes it."""
    from fedge.config import from_mapping, to_mapping
    from fedge.plugins.train.config import TrainConfig
    from fedge.rundir import RunDir

    cfg = from_mapping(TrainConfig, {**TINY, **settings})
    RunDir(path).write_config(to_mapping(cfg))
    return path


_RANK_SCRIPT = """
import os, sys
from pathlib import Path
from fedge.plugins.train.trainer import run
for run_dir, port in zip(sys.argv[1::2], sys.argv[2::2]):
    os.environ["MASTER_PORT"] = port
    run(Path(run_dir))
"""


def _run_workers(world: int, run_dirs: list[Path], *, timeout_s: float = 300) -> None:
    """Run the worker loop of each run directory in turn on ``world`` fresh gloo processes.

    Fresh interpreters, not forks: a fork of a process that already ran multi-threaded torch ops hangs.
    """
    args = [a for d in run_dirs for a in (str(d), str(free_port()))]
    procs = []
    for rank in range(world):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONSAFEPATH="1",
        )
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, *args], env=env, stderr=subprocess.PIPE, text=True))
    errors = []
    try:
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=timeout_s)
            if proc.returncode:
                errors.append(f"rank {rank} exited {proc.returncode}: {err[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not errors, "\n".join(errors)


def _reference_state(
    num_steps: int, *, lr: float = 0.05, momentum: float = 0.9, lr_of_step: Any = None, model: str = "", model_options: Any = None,
    frozen_of_step: Any = None,
) -> tuple[dict, list[float]]:
    """Single-process SGD on the same global batches: final state_dict and per-step losses.

    ``frozen_of_step(step)``: how many leading layers with parameters are frozen (requires_grad off) in that step.
    """
    import torch
    import torch.nn.functional as F

    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model
    from fedge.plugins.train.trainer import BatchOrder

    data = load_dataset(TINY["dataset"])
    options = TINY["model_options"] if model_options is None else model_options
    model = build_model(
        model or TINY["model"], {"seed": TINY["seed"], **options},
        input_shape=data.input_shape, num_classes=data.num_classes,
    )
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    order = BatchOrder(len(x), TINY["batch_size"], TINY["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for step in range(num_steps):
        if lr_of_step is not None:
            for g in opt.param_groups:
                g["lr"] = lr_of_step(step)
        if frozen_of_step is not None:
            holders = [c for c in model.children() if list(c.parameters())]
            for block in holders[: frozen_of_step(step)]:
                block.requires_grad_(False)
        idx = order.indices(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.state_dict(), losses


@pytest.fixture
def fedge_env() -> dict[str, str]:
    """Environment for running the real ``fedge`` CLI in a subprocess."""
    return dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def write_run():
    """``write_run(path, **settings)``: a run directory with config.toml (TINY settings + ``settings``)."""
    return _write_run


@pytest.fixture(scope="session")
def run_workers():
    """``run_workers(world, [run_dir, ...])``: the real worker loop on forked gloo processes."""
    return _run_workers


@pytest.fixture(scope="session")
def reference_state():
    """``reference_state(steps, ...)``: single-process SGD's final state_dict and per-step losses."""
    return _reference_state


@pytest.fixture(scope="session")
def tiny_settings() -> dict[str, Any]:
    """The TINY job settings every ``write_run`` starts from (test modules cannot import conftest)."""
    return dict(TINY)
