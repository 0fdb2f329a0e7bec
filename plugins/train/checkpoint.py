"""Checkpoints of a training run: one file per rank per step, then an atomic ``latest.json`` pointer.

Layout under the run directory::

    checkpoints/step-00000040/rank-0.pt   # {"step", "rng", "strategy": strategy.state_for_checkpoint()}
    checkpoints/latest.json               # {"step": 40, "world_size": 2, "strategy": ..., "replicated": ...}

Every file is written atomically, and ``latest.json`` only after every rank has written its file (the
worker puts a barrier in between), so a crash at any moment leaves the previous checkpoint usable. A
``replicated`` strategy (plain data parallel) has the same state on every rank: only rank 0 writes it,
and a job with a different world size can resume from it.

A ``resizable`` strategy (every built-in one) is checkpointed with torch.distributed.checkpoint (DCP)
instead: its :meth:`~fedge.plugins.train.base.Strategy.global_state` - the model and SGD momentum as one
process would hold them - goes to ``checkpoints/step-N/`` (DCP's ``.metadata`` + ``*.distcp``, each tensor
written once), beside ``rng-R.pt`` per rank; ``latest.json`` says ``"format": "dcp"``. Any world size loads
it, and each rank takes its part (a parameter server's shard, a pipeline stage's layers, a tp slice).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.errors import ConfigError, DataError
from fedge.rundir import atomic_path, atomic_write_text

__all__ = ["Checkpointer", "latest", "load_rank", "rng_state", "save_rank", "set_rng_state", "write_latest"]


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


class Checkpointer:
    """Saves and restores one rank's part of a training run's checkpoints (see the module docstring).

    Args:
        run_dir: the run directory.
        strategy_name: recorded in ``latest.json``; a resume with another strategy is refused.
        every: checkpoint every this many steps (0: never).
        keep: how many of the newest checkpoints to keep.
        replicated: every rank holds the same state (only rank 0 writes it; any world size resumes).
        rank, world_size: this process and its job.
    """

    def __init__(
        self, run_dir: Path, *, strategy_name: str, every: int, keep: int, replicated: bool, rank: int, world_size: int
    ) -> None:
        self.run_dir, self.strategy_name, self.every, self.keep = run_dir, strategy_name, every, keep
        self.replicated, self.rank, self.world_size = replicated, rank, world_size

    def due(self, steps_done: int, num_steps: int) -> bool:
        """Whether to checkpoint after ``steps_done`` steps of ``num_steps``."""
        return bool(self.every) and (steps_done % self.every == 0 or steps_done == num_steps)

    def restore(self, strategy: Any) -> int:
        """Load the newest complete checkpoint into ``strategy`` (after its ``setup``); returns its step, 0 if none."""
        meta = latest(self.run_dir)
        if meta is None:
            return 0
        where = str(self.run_dir)
        if meta.get("strategy") != self.strategy_name:
            raise ConfigError(
                f"the checkpoint in {where!r} was written by strategy {meta.get('strategy')!r}, not "
                f"{self.strategy_name!r}; resume with the same strategy or use a new --out directory"
            )
        if meta.get("format") == "dcp":
            return self._restore_dcp(strategy, int(meta["step"]))
        if not self.replicated and meta.get("world_size") != self.world_size:
            raise ConfigError(
                f"the checkpoint in {where!r} holds {meta.get('world_size')} ranks' shards but this job has "
                f"{self.world_size} processes; {self.strategy_name} resumes only at the same world size"
            )
        step = int(meta["step"])
        own = load_rank(self.run_dir, step, self.rank) if self.rank < int(meta["world_size"]) else None
        payload = load_rank(self.run_dir, step, 0) if self.replicated else own
        assert payload is not None
        strategy.load_checkpoint_state(payload["strategy"])
        set_rng_state((own or payload)["rng"])
        return step

    def _restore_dcp(self, strategy: Any, step: int) -> int:
        import torch.distributed.checkpoint as dcp

        state = {"strategy": strategy.global_state()}  # the template DCP loads into, at this world size
        dcp.load(state, checkpoint_id=str(_step_dir(self.run_dir, step)))
        strategy.load_global_state(state["strategy"], step=step)
        own, first = _step_dir(self.run_dir, step) / f"rng-{self.rank}.pt", _step_dir(self.run_dir, step) / "rng-0.pt"
        set_rng_state(torch.load(own if own.is_file() else first, map_location="cpu", weights_only=False))
        return step

    def save(self, strategy: Any, step: int) -> None:
        """Write this rank's part of the checkpoint after ``step`` steps; rank 0 then points ``latest.json`` at it."""
        import torch.distributed as dist

        if getattr(strategy, "resizable", False):
            self._save_dcp(strategy, step)
            return
        payload: dict[str, Any] = {"step": step, "rng": rng_state()}
        if self.rank == 0 or not self.replicated:
            payload["strategy"] = strategy.state_for_checkpoint()
        save_rank(self.run_dir, step, self.rank, payload)
        dist.barrier()  # latest.json may only name a checkpoint every rank has finished writing
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "strategy": self.strategy_name, "replicated": self.replicated}
            write_latest(self.run_dir, meta, keep=self.keep)

    def _save_dcp(self, strategy: Any, step: int) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        directory = _step_dir(self.run_dir, step)
        dcp.save({"strategy": strategy.global_state()}, checkpoint_id=str(directory))
        with atomic_path(directory / f"rng-{self.rank}.pt") as tmp:
            torch.save(rng_state(), tmp)
        dist.barrier()  # latest.json may only name a checkpoint every rank has finished writing
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "strategy": self.strategy_name, "format": "dcp"}
            write_latest(self.run_dir, meta, keep=self.keep)
