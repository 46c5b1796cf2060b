"""Real datasets (offline) and client partitions."""

from securefed.data.datasets import DatasetError, ImageDataset, load_dataset, split_member_holdout
from securefed.data.partition import PartitionError, label_histogram, partition

__all__ = [
    "DatasetError",
    "ImageDataset",
    "PartitionError",
    "label_histogram",
    "load_dataset",
    "partition",
    "split_member_holdout",
]
