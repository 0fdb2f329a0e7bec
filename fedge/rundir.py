"""Run directories (``runs/<kind>-<timestamp>/``) and atomic file writes.

Every artefact is written to a temporary file in the same directory and renamed into place, so
a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedge.config import dump_toml

__all__ = ["RunDir", "atomic_path", "atomic_write_bytes", "atomic_write_text"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Example::

        with atomic_path(run.path / "model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class RunDir:
    """One command's output directory: resolved config, metrics as JSON lines, artefacts.

    Args:
        path: the directory; created if missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, kind: str, out: str | Path | None = None, *, root: str | Path = "runs") -> RunDir:
        """``out`` if given, else a new ``<root>/<kind>-<YYYYmmdd-HHMMSS>`` (suffixed if taken)."""
        if out is not None:
            return cls(out)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root) / f"{kind}-{stamp}"
        candidate, n = base, 1
        while True:
            try:
                candidate.mkdir(parents=True, exist_ok=False)
                return cls(candidate)
            except FileExistsError:
                n += 1
                candidate = base.with_name(f"{base.name}-{n}")

    def file(self, name: str) -> Path:
        """Path of an artefact inside the run directory."""
        return self.path / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write an artefact atomically."""
        return atomic_write_bytes(self.file(name), data)

    def write_text(self, name: str, text: str) -> Path:
        """Write a text artefact atomically."""
        return atomic_write_text(self.file(name), text)

    def write_json(self, name: str, data: Any) -> Path:
        """Write a JSON artefact atomically (indented, keys in insertion order)."""
        return self.write_text(name, json.dumps(data, indent=2) + "\n")

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved configuration as ``config.toml``."""
        return self.write_text("config.toml", dump_toml(config))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON object as a line of ``metrics.jsonl`` (flushed and synced)."""
        with open(self.file("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``; a torn last line (from a crash) is skipped."""
        path = self.file("metrics.jsonl")
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records
