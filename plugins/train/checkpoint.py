"""Checkpoints of a training run: one file per rank per step, then an atomic ``latest.json`` pointer.

Layout under the run directory::

    checkpoints/step-00000040/rank-0.pt   # {"step", "rng", "strategy": strategy.state_for_checkpoint()}
    checkpoints/latest.json               # {"step": 40, "world_size": 2, "strategy": ..., "replicated": ...}

Every file is written atomically, and ``latest.json`` only after every rank has written its file (the
worker puts a barrier in between), so a crash at any moment leaves the previous checkpoint usable. A
``replicated`` strategy (plain data parallel) has the same state on every rank: only rank 0 writes it,
and a job with a different world size can resume from it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.errors import DataError
from fedge.rundir import atomic_path, atomic_write_text

__all__ = ["latest", "load_rank", "rng_state", "save_rank", "set_rng_state", "write_latest"]


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, cuda)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank(run_dir: Path, step: int, rank: int, payload: dict[str, Any]) -> None:
    """Write this rank's file of the checkpoint after ``step`` steps, atomically."""
    with atomic_path(_step_dir(run_dir, step) / f"rank-{rank}.pt") as tmp:
        torch.save(payload, tmp)


def write_latest(run_dir: Path, meta: dict[str, Any], *, keep: int) -> None:
    """Point ``latest.json`` at a complete checkpoint and delete all but the ``keep`` newest ones."""
    atomic_write_text(run_dir / "checkpoints" / "latest.json", json.dumps(meta) + "\n")
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> dict[str, Any] | None:
    """The ``latest.json`` record, or None when the run has no complete checkpoint."""
    path = run_dir / "checkpoints" / "latest.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        int(meta["step"])
        return meta
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{str(path)!r} is not a fedge checkpoint pointer: {err}; delete it to start over") from err


def load_rank(run_dir: Path, step: int, rank: int) -> dict[str, Any]:
    """Read one rank's file of the checkpoint after ``step`` steps."""
    path = _step_dir(run_dir, step) / f"rank-{rank}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise DataError(f"checkpoint file {str(path)!r} is missing; the checkpoint is incomplete") from err
