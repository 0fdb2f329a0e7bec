"""fedge: training where data and compute are spread out, and where that training loses time.

The core is framework-free: plugin registry, typed config, run directories, errors and CLI.
Everything that trains, exports or analyses is a plugin (``fedge.plugins``, ``fedge.edge``,
``fedge.profiler``), found through entry points.
"""

from fedge.config import PartitionConfig, from_mapping, load_toml, parse_partition
from fedge.errors import (
    ConfigError,
    DataError,
    DuplicatePluginError,
    FedgeError,
    Interrupted,
    PartialResultError,
    PluginLoadError,
    PluginNotFoundError,
    RuntimeFailure,
    StorageError,
)
from fedge.registry import Chosen, Kind, PluginSpec, Registry, plugin
from fedge.rundir import RunDir, atomic_write_bytes, atomic_write_text

__version__ = "0.1.0"

__all__ = [
    "Chosen",
    "ConfigError",
    "DataError",
    "DuplicatePluginError",
    "FedgeError",
    "Interrupted",
    "Kind",
    "PartialResultError",
    "PartitionConfig",
    "PluginLoadError",
    "PluginNotFoundError",
    "PluginSpec",
    "Registry",
    "RunDir",
    "RuntimeFailure",
    "StorageError",
    "atomic_write_bytes",
    "atomic_write_text",
    "from_mapping",
    "load_toml",
    "parse_partition",
    "plugin",
]
