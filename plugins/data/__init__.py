"""Datasets as arrays, and the partitioners that split them across clients or workers."""

from fedge.plugins.data.base import ArrayDataset, dataset_config, load_dataset
from fedge.plugins.data.partition import PartitionStats, partition, partition_stats

__all__ = ["ArrayDataset", "PartitionStats", "dataset_config", "load_dataset", "partition", "partition_stats"]
