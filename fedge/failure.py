"""One record of a child process's failure: written by the child, read by whoever started it.

torchrun workers, the Flower ServerApp and the edge conversion child all fail the same way: they write
``record_failure(path, err)`` (a small JSON file, written atomically) and exit; the parent calls
``read_failure(path)`` and raises ``failure.to_error()``, so the user sees the child's own one line.
Example::

    try:
        work()
    except Exception as err:
        record_failure(run.file("errors/rank-1.json"), err, where="rank 1")
        raise
"""

from __future__ import annotations

import json
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from fedge import errors
from fedge.rundir import atomic_write_text

__all__ = ["Failure", "read_failure", "record_failure"]


@dataclass(frozen=True, slots=True)
class Failure:
    """What a child process recorded when it failed."""

    message: str
    """The one line a user reads."""
    error_type: str
    """Class name of the error, e.g. ``ConfigError``; a fedge error type is raised again as itself."""
    exit_code: int
    """The exit code the parent should end with."""
    where: str = ""
    """Which child it was, e.g. ``rank 1`` or ``serverapp``."""
    traceback: str = ""
    """The child's traceback, shown only with ``--verbose``."""

    def to_error(self) -> errors.FedgeError:
        """The FedgeError to raise in the parent: the recorded fedge type, else a RuntimeFailure."""
        cls = getattr(errors, self.error_type, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.FedgeError)):
            cls = errors.RuntimeFailure
        prefix = f"{self.where}: " if self.where and not self.message.startswith(self.where) else ""
        err = cls(f"{prefix}{self.message}")
        err.exit_code = self.exit_code
        return err


def record_failure(
    path: str | Path, err: BaseException | str, *, exit_code: int | None = None, where: str = ""
) -> Path:
    """Write ``err`` as a failure record at ``path`` (atomically; parent directories are created).

    Args:
        path: where the record goes, e.g. ``RUN/errors/rank-1.json``.
        err: the exception (its type and message are kept) or a message.
        exit_code: defaults to the error's own ``exit_code`` (fedge errors), else 70 for a bug.
        where: which child this is, shown before the message.
    """
    if isinstance(err, BaseException):
        error_type = type(err).__name__
        message = str(err) or error_type
        code = exit_code if exit_code is not None else getattr(err, "exit_code", 70)
        tb = "".join(traceback.format_exception(err))
        if not isinstance(err, errors.FedgeError):
            message = f"{error_type}: {message}"
    else:
        error_type, message, code, tb = "RuntimeFailure", err, 3 if exit_code is None else exit_code, ""
    record = Failure(message=message, error_type=error_type, exit_code=int(code), where=where, traceback=tb)
    return atomic_write_text(path, json.dumps(asdict(record), indent=2) + "\n")


def read_failure(path: str | Path) -> Failure | None:
    """The failure recorded at ``path``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Failure(
            message=str(data["message"]),
            error_type=str(data.get("error_type", "RuntimeFailure")),
            exit_code=int(data.get("exit_code", 3)),
            where=str(data.get("where", "")),
            traceback=str(data.get("traceback", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
