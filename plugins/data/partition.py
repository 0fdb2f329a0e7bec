"""Split a dataset's samples across clients or workers: iid, Dirichlet label skew, label shards.

Every scheme is seeded, returns disjoint index arrays that cover the training set, and never
leaves a partition empty (so every client can train).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.config import PartitionConfig
from fedge.errors import ConfigError

__all__ = ["PartitionStats", "partition", "partition_stats"]


def partition(labels: np.ndarray, num_partitions: int, config: PartitionConfig) -> list[np.ndarray]:
    """Indices of ``labels`` for each of ``num_partitions`` parts.

    Raises:
        ConfigError: more partitions than samples, or more shards than samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_partitions < 1:
        raise ConfigError(f"need at least 1 partition, got {num_partitions}")
    if num_partitions > n:
        raise ConfigError(f"cannot split {n} samples into {num_partitions} partitions; use fewer clients")
    rng = np.random.default_rng(config.seed)
    if config.scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif config.scheme == "dirichlet":
        parts = _dirichlet(labels, num_partitions, config.alpha, rng)
    else:
        parts = _shards(labels, num_partitions, config.shards_per_client, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    # Per class, draw each partition's share from Dir(alpha); redraw while a partition is too small.
    min_size = max(1, min(10, len(labels) // (4 * k)))
    for _ in range(100):
        buckets: list[list[int]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for b, chunk in zip(buckets, np.split(idx, cuts)):
                b.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_size:
            break
    else:
        # Very small alpha with many parts: top up the emptiest parts from the largest.
        for b in sorted(buckets, key=len):
            while len(b) < min_size:
                donor = max(buckets, key=len)
                b.append(donor.pop())
    return [np.asarray(b) for b in buckets]


def _shards(labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    num_shards = k * per_client
    if num_shards > len(labels):
        raise ConfigError(f"{k} partitions x {per_client} shards needs {num_shards} samples; only {len(labels)}")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(k, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """Size and label histogram of one partition."""

    partition_id: int
    size: int
    label_histogram: list[int]

    def to_json(self) -> dict[str, object]:
        return {"partition_id": self.partition_id, "size": self.size, "label_histogram": self.label_histogram}


def partition_stats(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[PartitionStats]:
    """Per-partition size and label counts (for reports and ``partitions.json``)."""
    labels = np.asarray(labels)
    return [
        PartitionStats(i, len(p), np.bincount(labels[p], minlength=num_classes).astype(int).tolist())
        for i, p in enumerate(parts)
    ]
