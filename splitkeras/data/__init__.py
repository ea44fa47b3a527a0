"""Datasets for splitkeras: loading, partitioning among clients, pipelines."""

from splitkeras.data.arrays import DatasetArrays
from splitkeras.data.partition import partition
from splitkeras.data.pipeline import eval_dataset, steps_per_epoch, train_dataset
from splitkeras.data.sources import load

__all__ = [
    "DatasetArrays",
    "eval_dataset",
    "load",
    "partition",
    "steps_per_epoch",
    "train_dataset",
]
