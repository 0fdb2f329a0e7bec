"""A user's NumPy ``.npz`` file with ``x``/``y`` arrays (optionally ``x_test``/``y_test``)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.errors import DataError
from fedge.plugins.data.base import ArrayDataset, SplitConfig, split_train_test
from fedge.registry import plugin


@plugin("dataset", "npz")
class Npz:
    """Arrays from a .npz file: x (n, ...) and integer labels y; x_test/y_test if present, else a split."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(SplitConfig):  # the split applies only when the file has no x_test/y_test
        path: Path
        """The .npz file."""

    @staticmethod
    def load(config: Config) -> ArrayDataset:
        if not config.path.is_file():
            raise DataError(
                f"npz file {str(config.path)!r} not found; set [dataset_options] path to an existing .npz file"
            )
        try:
            with np.load(config.path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"cannot read {str(config.path)!r} as .npz: {err}") from err
        if "x" not in arrays or "y" not in arrays:
            raise DataError(
                f"{str(config.path)!r} must hold arrays named x and y; found {', '.join(arrays) or 'none'}"
            )
        if "x_test" in arrays and "y_test" in arrays:
            y_all = np.concatenate([arrays["y"], arrays["y_test"]])
            classes, ids = np.unique(y_all, return_inverse=True)
            n = len(arrays["y"])
            return ArrayDataset(
                name="npz",
                x_train=np.ascontiguousarray(arrays["x"], dtype=np.float32),
                y_train=ids[:n].astype(np.int64),
                x_test=np.ascontiguousarray(arrays["x_test"], dtype=np.float32),
                y_test=ids[n:].astype(np.int64),
                num_classes=len(classes),
            )
        return split_train_test(
            "npz", arrays["x"], arrays["y"], test_fraction=config.test_fraction, seed=config.seed
        )
