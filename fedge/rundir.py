"""Run directories (``runs/<kind>-<timestamp>/``) and atomic file writes.

Every artefact is written to a temporary file in the same directory and renamed into place, so
a reader (or a crash) never sees half a file. A directory that holds a run is never written into again
by a new run: :meth:`RunDir.create` refuses it unless the command resumes it, or the user asked to
replace it whole (``--overwrite``). Example::

    with RunDir.create("fl", out, overwrite=overwrite) as run:
        run.write_config(resolved)
        ...  # on an error the replaced run comes back untouched
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from fedge.config import dump_toml
from fedge.errors import ConfigError, StorageError

__all__ = ["RUN_MARKER", "RunDir", "a_run", "atomic_path", "atomic_write_bytes", "atomic_write_text", "run_kind"]

RUN_MARKER = ".fedge-run"
"""The file every run directory holds: ``{"kind": ..., "created": ...}``."""
# What a run directory written before the marker existed holds; any of them makes it a run.
_LEGACY_FILES = ("config.toml", "metrics.jsonl", "model.pt", "edge-report.json", "ca.crt", "summary.json")
_MIN_FREE_BYTES = 16 * 2**20


def run_kind(path: str | Path) -> str | None:
    """The kind of run ``path`` holds (``fl``, ``train``, ...), ``"unknown"`` for an older run, or None."""
    path = Path(path)
    marker = path / RUN_MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text(encoding="utf-8")).get("kind") or "unknown")
        except (OSError, ValueError, AttributeError):
            return "unknown"
    if path.is_dir() and any((path / name).exists() for name in _LEGACY_FILES):
        return "unknown"
    return None


def _storage_error(path: Path, err: OSError, what: str) -> StorageError:
    cause = err.strerror or type(err).__name__
    return StorageError(f"cannot {what} {str(path)!r}: {cause}; choose a writable directory with free space (--out)")


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


def a_run(kind: str) -> str:
    """``"a train run"``, ``"an edge run"``: a run kind with its article, for messages (``"a run"`` for a run
    of no known kind)."""
    if kind == "unknown":
        return "a run"
    vowel_sound = kind[:1] in "aeiou" or kind == "fl"  # "fl" is read as letters: "an fl run"
    return f"{'an' if vowel_sound else 'a'} {kind} run"


class RunDir:
    """One command's output directory: resolved config, metrics as JSON lines, artefacts.

    ``RunDir(path)`` opens a directory as it is (child processes, readers); commands make theirs with
    :meth:`create`, which applies the rule that a run is never mixed with another.

    Args:
        path: the directory; created if missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._replaced: Path | None = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError as err:
            raise StorageError(f"--out {str(self.path)!r} is a file, not a directory; choose a directory") from err
        except OSError as err:
            raise _storage_error(self.path, err, "create the run directory") from err

    @classmethod
    def create(
        cls,
        kind: str,
        out: str | Path | None = None,
        *,
        root: str | Path = "runs",
        resume: bool = False,
        overwrite: bool = False,
        resumable: bool = False,
        min_free_bytes: int = _MIN_FREE_BYTES,
        flag: str = "--out",
    ) -> RunDir:
        """The run directory of a new (or resumed) run of ``kind``, checked before any work.

        Args:
            kind: ``fl``, ``train``, ``edge``, ``profile``, ``bench``, ``certs``...
            out: the user's ``--out``; None makes ``<root>/<kind>-<YYYYmmdd-HHMMSS>`` (suffixed if taken).
            resume: reopen ``out``, which must hold a run of this kind.
            overwrite: replace the run in ``out`` whole. The old run is moved aside and comes back if the
                ``with`` block fails; it is deleted when the block ends without error.
            resumable: the command has ``--resume`` (named in the refusal).
            min_free_bytes: refuse a filesystem with less free space than this.
            flag: the option ``out`` came from, as the messages name it.

        Raises:
            ConfigError: ``out`` holds a run (and neither ``resume`` nor ``overwrite``), or nothing to resume.
            StorageError: ``out`` is a file, is not writable, or its filesystem is (nearly) full.
        """
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it")
        if out is None:
            run = cls(cls._fresh_path(kind, Path(root)))
        else:
            run = cls._at(kind, Path(out), resume=resume, overwrite=overwrite, resumable=resumable, flag=flag)
        run._check_space(min_free_bytes)
        if not resume or not (run.path / RUN_MARKER).exists():
            run._write_marker(kind)
        return run

    @staticmethod
    def _fresh_path(kind: str, root: Path) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = root / f"{kind}-{stamp}"
        candidate, n = base, 1
        while True:
            try:
                candidate.mkdir(parents=True, exist_ok=False)
                return candidate
            except FileExistsError:
                n += 1
                candidate = base.with_name(f"{base.name}-{n}")
            except NotADirectoryError as err:
                raise StorageError(f"{str(root)!r} is not a directory; runs go in a directory (or pass --out)") from err
            except OSError as err:
                raise _storage_error(root, err, "create a run directory in") from err

    @classmethod
    def _at(cls, kind: str, out: Path, *, resume: bool, overwrite: bool, resumable: bool, flag: str) -> RunDir:
        if out.exists() and not out.is_dir():
            raise StorageError(f"{flag} {str(out)!r} is a file, not a directory; choose a directory")
        held = run_kind(out)
        if resume:
            if held is None:
                raise ConfigError(f"nothing to resume in {str(out)!r}: it holds no run; start one with {flag} {out}")
            if held not in (kind, "unknown"):
                raise ConfigError(
                    f"{str(out)!r} holds {a_run(held)}, not {a_run(kind)}; resume it with fedge's {held} command"
                )
            return cls(out)
        if held is None:
            return cls(out)
        if not overwrite:
            also = f", --resume {out} to continue it," if resumable and held in (kind, "unknown") else ""
            raise ConfigError(
                f"{flag} {str(out)!r} already holds {a_run(held)}; choose a new directory{also} or pass --overwrite to replace it"
            )
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        try:
            os.replace(out, aside / out.name)
        except OSError as err:
            aside.rmdir()
            raise _storage_error(out, err, "move aside the run in") from err
        run = cls(out)
        run._replaced = aside
        return run

    def _check_space(self, min_free_bytes: int) -> None:
        try:
            free = shutil.disk_usage(self.path).free
        except OSError as err:
            raise _storage_error(self.path, err, "read") from err
        if free < min_free_bytes:
            raise StorageError(
                f"only {free / 2**20:.1f} MiB free where {str(self.path)!r} lies (need {min_free_bytes / 2**20:.0f} MiB); "
                "free some space or choose another --out"
            )

    def _write_marker(self, kind: str) -> None:
        record = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            atomic_write_text(self.path / RUN_MARKER, json.dumps(record) + "\n")
        except OSError as err:
            self._restore()
            raise _storage_error(self.path, err, "write to") from err

    @property
    def kind(self) -> str | None:
        """The kind of run this directory holds, from its marker."""
        return run_kind(self.path)

    @property
    def replacing(self) -> bool:
        """True while an ``overwrite`` is unfinished: if it fails, the replaced run comes back."""
        return self._replaced is not None

    def commit(self) -> None:
        """Finish an ``overwrite``: delete the run this one replaced. Idempotent."""
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    def _restore(self) -> None:
        # An overwrite that failed: put the replaced run back as it was.
        if self._replaced is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self._replaced / self.path.name, self.path)
        shutil.rmtree(self._replaced, ignore_errors=True)
        self._replaced = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._restore()

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
