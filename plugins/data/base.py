"""The in-memory form every dataset plugin returns, and the helper that builds one by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedge.config import from_mapping
from fedge.errors import ConfigError, DataError
from fedge.registry import Kind, Registry

__all__ = ["ArrayDataset", "DatasetPlugin", "SplitConfig", "dataset_config", "load_dataset", "split_train_test"]


@dataclass(frozen=True, slots=True)
class ArrayDataset:
    """Train and held-out arrays: ``x`` float32 of shape (n, *input_shape), ``y`` int64 class ids."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise DataError(f"dataset {self.name!r}: {split} has {len(x)} inputs but {len(y)} labels")
        if len(self.x_train) == 0:
            raise DataError(f"dataset {self.name!r} has no training samples")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 8, 8)."""
        return tuple(int(d) for d in self.x_train.shape[1:])


class DatasetPlugin(Protocol):
    """What a ``dataset`` plugin provides: a nested ``Config`` and ``load``."""

    Config: type

    @staticmethod
    def load(config: Any) -> ArrayDataset: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitConfig:
    """The train/test split settings a dataset plugin's ``Config`` inherits when it holds out part of its samples."""

    test_fraction: float = 0.2
    """Share of samples held out for evaluation (stratified when every class can be)."""
    seed: int = 0
    """Seed of the train/test split."""

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")


def split_train_test(
    name: str, x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int
) -> ArrayDataset:
    """Deterministic stratified split (plain shuffled split when a class is too small to stratify).

    Raises:
        DataError: ``x`` and ``y`` differ in length.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    if len(x) != len(y):
        raise DataError(f"dataset {name!r} has {len(x)} inputs but {len(y)} labels; they must match one to one")
    classes, y_ids = np.unique(y, return_inverse=True)
    counts = np.bincount(y_ids)
    stratify = y_ids if counts.min() >= 2 and len(y) * test_fraction >= len(classes) else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y_ids, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return ArrayDataset(
        name=name,
        x_train=np.ascontiguousarray(x_tr, dtype=np.float32),
        y_train=y_tr.astype(np.int64),
        x_test=np.ascontiguousarray(x_te, dtype=np.float32),
        y_test=y_te.astype(np.int64),
        num_classes=len(classes),
    )


def dataset_config(
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    command: str = "",
    registry: Registry[DatasetPlugin] | None = None,
) -> Any:
    """The dataset plugin ``name``'s validated Config for ``options``, without reading any data.

    Commands call it before they create a run directory, so a bad option fails in one line and leaves nothing.

    Args:
        name: dataset plugin name.
        options: its Config fields (the ``[dataset_options]`` table of a run's TOML config).
        command: the command the user runs, e.g. ``"fedge fl run"``; a missing option's message then says
            how to give it to that command (dataset options have no flags: they live in the TOML file).
        registry: where to look the plugin up (default: the installed dataset plugins).

    Raises:
        PluginNotFoundError: no such dataset plugin.
        ConfigError: a required option is missing, unknown, or has a bad value.

    Example::

        dataset_config("npz", {"path": "data.npz"}, command="fedge fl run")
    """
    registry = registry or Registry(Kind.DATASET)
    plugin = registry.get(name)
    fields = [f for f in dataclasses.fields(plugin.Config) if f.init]
    missing = [
        f.name
        for f in fields
        if f.name not in (options or {})
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        table = f'[dataset_options] {missing[0]} = "..."'
        if command:
            how = f"it has no flag: put  {table}  in a TOML file and pass the file: {command} FILE.toml"
        else:
            how = f"set  {table}  in the run's TOML config"
        raise ConfigError(f"dataset {name!r} needs dataset_options.{missing[0]}; {how}")
    return from_mapping(plugin.Config, options or {}, where="dataset_options")


def load_dataset(
    name: str, options: Mapping[str, Any] | None = None, *, registry: Registry[DatasetPlugin] | None = None
) -> ArrayDataset:
    """Load the dataset plugin ``name`` with ``options`` (its Config fields).

    Raises:
        PluginNotFoundError: no such dataset plugin.
        ConfigError: a missing, unknown or bad option (see :func:`dataset_config`).
        DataError: the data cannot be read (a missing file, a malformed one).

    Example::

        data = load_dataset("digits", {"test_fraction": 0.2})
    """
    registry = registry or Registry(Kind.DATASET)
    config = dataset_config(name, options, registry=registry)
    return registry.get(name).load(config)
