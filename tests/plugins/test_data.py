"""Datasets and partitioners."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedge.config import PartitionConfig
from fedge.errors import ConfigError, DataError
from fedge.plugins.data import load_dataset, partition, partition_stats


def test_digits_is_embedded_and_deterministic() -> None:
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    assert np.array_equal(a.y_test, b.y_test)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    assert set(np.unique(a.y_test)) == set(range(10))  # stratified


def test_npz_and_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((50, 3)), y=rng.integers(0, 2, 50))
    data = load_dataset("npz", {"path": str(tmp_path / "d.npz")})
    assert data.input_shape == (3,) and len(data.x_train) == 40

    (tmp_path / "d.csv").write_text("a,b,label\n" + "\n".join(f"{i},{i * 2},{'yes' if i % 2 else 'no'}" for i in range(20)))
    data = load_dataset("csv", {"path": str(tmp_path / "d.csv"), "label": "label"})
    assert data.num_classes == 2 and data.input_shape == (2,)


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("L", (10, 12), color=40 * i).save(tmp_path / cls / f"{i}.png")
    data = load_dataset("image-folder", {"path": str(tmp_path), "size": 8})
    assert data.input_shape == (1, 8, 8) and data.num_classes == 2


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("npz", {"path": "/nonexistent.npz"}, "not found"),
        ("npz", {}, "dataset 'npz' needs dataset_options.path; set  [dataset_options] path = \"...\"  in the run"),
        ("csv", {"path": "x.csv", "colour": "red"}, "unknown setting dataset_options.colour"),
        ("digits", {"test_fraction": 2}, "test_fraction must be between 0 and 1"),
        ("npz", {"path": "x.npz", "test_fraction": 0}, "test_fraction must be between 0 and 1"),
        ("csv", {"path": "x.csv", "test_fraction": 1.5}, "test_fraction must be between 0 and 1"),
        ("image-folder", {"path": ".", "size": 0}, "size must be >= 1"),
    ],
)
def test_dataset_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises((DataError, ConfigError), match=re.escape(message)):
        load_dataset(name, options)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("bad.npz", None, "dataset 'npz' has 10 inputs but 8 labels"),
        ("bad.csv", b"a,b\n1,\xe9\n", "cannot read"),
    ],
    ids=["npz-length-mismatch", "csv-not-utf8"],
)
def test_malformed_files_fail_with_a_data_error(file: str, content: bytes | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / file
    if content is None:
        np.savez(path, x=np.zeros((10, 3)), y=np.zeros(8))
    else:
        path.write_bytes(content)

    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(path.suffix[1:], {"path": str(path)})


def test_npz_without_x_and_y(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    with pytest.raises(DataError, match="must hold arrays named x and y; found features"):
        load_dataset("npz", {"path": str(tmp_path / "bad.npz")})


@pytest.mark.parametrize(
    "config",
    [PartitionConfig(scheme="iid"), PartitionConfig(scheme="dirichlet", alpha=0.1), PartitionConfig(scheme="shards")],
)
def test_partitions_are_disjoint_complete_and_seeded(config: PartitionConfig) -> None:
    labels = load_dataset("digits").y_train
    parts = partition(labels, 8, config)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))
    assert all(len(p) > 0 for p in parts)
    again = partition(labels, 8, config)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_non_iid_partitions_are_skewed() -> None:
    labels = load_dataset("digits").y_train
    iid = partition_stats(labels, partition(labels, 5, PartitionConfig(scheme="iid")), 10)
    shards = partition_stats(labels, partition(labels, 5, PartitionConfig(scheme="shards", shards_per_client=2)), 10)
    assert all(sum(1 for c in s.label_histogram if c) == 10 for s in iid)
    assert all(sum(1 for c in s.label_histogram if c) <= 4 for s in shards)
    assert sum(s.size for s in shards) == len(labels)


def test_too_many_partitions() -> None:
    with pytest.raises(ConfigError, match="use fewer clients"):
        partition(np.zeros(3, dtype=int), 5, PartitionConfig())
