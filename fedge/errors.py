"""The error types of fedge: one root, each with the exit code the CLI uses for it."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DuplicatePluginError",
    "FedgeError",
    "Interrupted",
    "PartialResultError",
    "PluginLoadError",
    "PluginNotFoundError",
    "RuntimeFailure",
    "StorageError",
]


class FedgeError(Exception):
    """Root of every error fedge raises on purpose.

    The message is one line a user can act on: what was expected, what was found, what to do.
    """

    exit_code: int = 1


class ConfigError(FedgeError, ValueError):
    """A configuration value, file or flag is invalid."""


class DataError(FedgeError, ValueError):
    """A dataset, model file or trace cannot be read or has the wrong shape."""


class PluginNotFoundError(FedgeError, LookupError):
    """No plugin of that kind has that name."""


class DuplicatePluginError(FedgeError, LookupError):
    """Two distributions register the same plugin name."""


class PluginLoadError(FedgeError, ImportError):
    """A plugin's entry point failed to import or is not a fedge plugin."""


class RuntimeFailure(FedgeError, RuntimeError):
    """A component fedge started (a process, a runtime) failed or timed out."""

    exit_code = 3


class PartialResultError(FedgeError):
    """The command produced a result, but some inputs were skipped (exit code 2)."""

    exit_code = 2


class StorageError(FedgeError, OSError):
    """The user's filesystem refused a write: read-only, full, a file where a directory belongs (exit code 1)."""


class Interrupted(FedgeError):
    """Ctrl-C or SIGTERM stopped the command; the message says what was kept and how to resume (exit code 130)."""

    exit_code = 130
