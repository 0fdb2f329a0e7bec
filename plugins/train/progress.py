"""What ``fedge train`` shows while torchrun runs: a rich progress bar fed by rank 0's ``metrics.jsonl``,
and, on multi-node jobs, which node this is (when the rendezvous places it, again after a re-rendezvous)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedge.rundir import RunDir

__all__ = ["TrainProgress", "node_line", "read_node"]


def read_node(path: Path | None) -> dict[str, Any] | None:
    """The node record the workers wrote (multi-node jobs), or None."""
    if path is None or not path.is_file():
        return None
    try:
        node: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return node


def node_line(node: dict[str, Any]) -> str:
    """Which node of the job this is, and where rank 0's outputs are."""
    lo, hi = node["ranks"]
    ranks = f"rank {lo}" if lo == hi else f"ranks {lo}-{hi}"
    where = (
        "this node writes metrics.jsonl, model.pt and summary.json"
        if node["node_rank"] == 0
        else f"node 0 ({node['rank0_host']}) writes metrics.jsonl, model.pt and summary.json to its run directory"
    )
    return f"node {node['node_rank']} of {node['num_nodes']} ({ranks} of {node['world_size']}); {where}"


class TrainProgress:
    """Follows ``metrics.jsonl`` (reading only new bytes) into a progress bar on stderr.

    Args:
        total_steps: the bar's length; None when unknown (``--epochs``).
        node_path: multi-node jobs: the node record to announce.
    """

    def __init__(self, total_steps: int | None, node_path: Path | None = None) -> None:
        self.node_path, self.node = node_path, None
        self.last_step = 0
        self._offset = 0
        self.progress = Progress(
            TextColumn("[bold]training steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=Console(stderr=True),
        )  # fmt: skip
        self._task = self.progress.add_task("starting torchrun", total=total_steps)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:  # stop() prints an empty line even when it never started
            self.progress.stop()

    def update(self, run: RunDir) -> None:
        """Show what is new in ``run`` since the last call."""
        node = read_node(self.node_path)
        if node is not None and node != self.node:
            self.node = node
            self.progress.console.print(f"fedge train: {node_line(node)}")
        record = self._newest(run.file("metrics.jsonl"))
        if record is None:
            return
        self.progress.start()
        self.last_step = int(record["step"])
        self.progress.update(
            self._task, completed=self.last_step,
            description=f"loss {record['loss']:.4f}  {record['samples_per_s']:.0f} samples/s",
        )  # fmt: skip

    def _newest(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        if path.stat().st_size < self._offset:  # rewritten on resume
            self._offset = 0
        with open(path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        newest = None
        for line in complete.splitlines():
            try:
                newest = json.loads(line)
            except json.JSONDecodeError:
                continue
        return newest
