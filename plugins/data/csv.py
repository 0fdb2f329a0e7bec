"""A user's CSV file: numeric feature columns and one label column."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.errors import DataError
from fedge.plugins.data.base import ArrayDataset, SplitConfig, split_train_test
from fedge.registry import plugin


@plugin("dataset", "csv")
class Csv:
    """Rows of a CSV file with a header: numeric features and a label column (name or last column)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(SplitConfig):
        path: Path
        """The CSV file (first row is the header)."""
        label: str = ""
        """Name of the label column; the last column when empty."""

    @staticmethod
    def load(config: Config) -> ArrayDataset:
        if not config.path.is_file():
            raise DataError(
                f"CSV file {str(config.path)!r} not found; set [dataset_options] path to an existing CSV file"
            )
        try:
            with open(config.path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"cannot read {str(config.path)!r} as UTF-8 CSV: {err}; save it as UTF-8 text") from err
        if len(rows) < 2:
            raise DataError(f"{str(config.path)!r} needs a header row and at least one data row")
        header, body = rows[0], rows[1:]
        label_idx = header.index(config.label) if config.label in header else len(header) - 1
        if config.label and config.label not in header:
            raise DataError(f"label column {config.label!r} not in {str(config.path)!r}; columns: {', '.join(header)}")
        feats, labels = [], []
        for lineno, row in enumerate(body, start=2):
            if len(row) != len(header):
                raise DataError(f"{config.path}:{lineno}: expected {len(header)} fields, found {len(row)}")
            try:
                feats.append([float(v) for i, v in enumerate(row) if i != label_idx])
            except ValueError as err:
                raise DataError(f"{config.path}:{lineno}: feature is not a number ({err})") from err
            labels.append(row[label_idx])
        return split_train_test(
            "csv", np.asarray(feats), np.asarray(labels), test_fraction=config.test_fraction, seed=config.seed
        )
