"""Datasets for splitkeras: loading, partitioning among clients, pipelines.

`load` and `partition` are numpy only; the tf.data pipelines load
TensorFlow on first use (see `splitkeras._lazy`).
"""

from splitkeras._lazy import attach

_EXPORTS = {
    "DatasetArrays": "splitkeras.data.arrays",
    "partition": "splitkeras.data.partition",
    "batches_in": "splitkeras.data.pipeline",
    "eval_dataset": "splitkeras.data.pipeline",
    "steps_per_epoch": "splitkeras.data.pipeline",
    "train_dataset": "splitkeras.data.pipeline",
    "load": "splitkeras.data.sources",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = attach(__name__, _EXPORTS)
