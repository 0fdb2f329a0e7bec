"""The in-memory form every dataset plugin returns, and the helper that builds one by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedge.config import from_mapping
from fedge.errors import DataError
from fedge.registry import Kind, Registry

__all__ = ["ArrayDataset", "DatasetPlugin", "load_dataset", "split_train_test"]


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


def split_train_test(
    name: str, x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int
) -> ArrayDataset:
    """Deterministic stratified split (plain shuffled split when a class is too small to stratify)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
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


def load_dataset(
    name: str, options: Mapping[str, Any] | None = None, *, registry: Registry[DatasetPlugin] | None = None
) -> ArrayDataset:
    """Load the dataset plugin ``name`` with ``options`` (its Config fields).

    Example::

        data = load_dataset("digits", {"test_fraction": 0.2})
    """
    registry = registry or Registry(Kind.DATASET)
    plugin = registry.get(name)
    config = from_mapping(plugin.Config, options or {}, where=f"dataset.{name}")
    return plugin.load(config)
