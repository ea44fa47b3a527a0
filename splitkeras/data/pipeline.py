"""tf.data input pipelines over in-memory numpy arrays.

The shuffling order of an epoch is a numpy permutation seeded with
(seed, epoch), so it is the same in every run and process, and a run resumed
mid-epoch sees exactly the batches it had not trained on yet.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def steps_per_epoch(
    num_examples: int, batch_size: int, drop_remainder: bool = False
) -> int:
    """Returns the number of batches in one pass over `num_examples`.

    Args:
      num_examples: Number of examples, >= 0.
      batch_size: Examples per batch, >= 1.
      drop_remainder: Whether a last, smaller batch is dropped.

    Raises:
      ValueError: If `num_examples` < 0 or `batch_size` < 1.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples={num_examples} must be >= 0.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def batches_in(dataset, count_unknown: bool = False) -> int:
    """The batches a round trains on `dataset`, as its BEGIN announces them:
    a `tf.data.Dataset`'s cardinality; a sized collection's length; else 0
    (an iterator would be used up).

    A dataset of unknown cardinality (after a filter) is 0 unless
    `count_unknown`: then it is iterated once to count it (SplitFed's step
    order and large-batch SGD need the count). That pass costs a pass of
    the input pipeline, and a dataset that reshuffles on each iteration
    then trains on the order of its next pass."""
    if isinstance(dataset, tf.data.Dataset):
        n = int(dataset.cardinality())
        if n >= 0 or not count_unknown:
            return max(n, 0)
        return sum(1 for _ in dataset)
    try:
        return len(dataset)
    except TypeError:
        return 0


def train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    drop_remainder: bool = False,
    stream: int | None = None,
    with_ids: bool = False,
) -> tf.data.Dataset:
    """Returns one shuffled epoch of `(images, labels)` batches.

    Args:
      x: Images; uint8 values are scaled to [0, 1], float values are kept.
      y: Integer labels, shape (examples,).
      batch_size: Examples per batch, >= 1.
      seed: Run seed, >= 0.
      epoch: Epoch number, >= 0; each epoch has its own order.
      skip_batches: Batches of this epoch already trained on, e.g. when
        resuming from a mid-epoch checkpoint. They are skipped before any
        image is read.
      drop_remainder: Whether to drop the last batch if it is smaller.
      stream: None, or the index of one of several independent orders drawn
        for the same (seed, epoch), e.g. one per client's shard.
      with_ids: also yield each example's row index as its sample id, as
        `(images, labels, ids)` (for aligning vertically split data).

    Returns:
      A dataset of (float32 images, int64 labels) batches, prefetched.

    Raises:
      ValueError: If the arguments are inconsistent or out of range.
    """
    _check_arrays(x, y)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must both be >= 0.")
    num_batches = steps_per_epoch(len(x), batch_size, drop_remainder)
    if not 0 <= skip_batches <= num_batches:
        raise ValueError(
            f"skip_batches={skip_batches} must be between 0 and the "
            f"{num_batches} batches of an epoch."
        )
    entropy = [seed, epoch] if stream is None else [seed, epoch, stream]
    order = np.random.default_rng(entropy).permutation(len(x))
    order = order[skip_batches * batch_size :]
    return _batches(x, y, order, batch_size, drop_remainder, with_ids)


def eval_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, with_ids: bool = False
) -> tf.data.Dataset:
    """Returns `(images, labels)` batches in stored order, last one partial.

    Args:
      x: Images; uint8 values are scaled to [0, 1], float values are kept.
      y: Integer labels, shape (examples,).
      batch_size: Examples per batch, >= 1.
      with_ids: also yield row indices as sample ids: `(images, labels, ids)`.

    Returns:
      A dataset of (float32 images, int64 labels) batches, prefetched.

    Raises:
      ValueError: If `x` and `y` do not match or `batch_size` < 1.
    """
    _check_arrays(x, y)
    steps_per_epoch(len(x), batch_size)  # Validates batch_size.
    order = np.arange(len(x))
    return _batches(x, y, order, batch_size, drop_remainder=False, with_ids=with_ids)


def _check_arrays(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels; they must match.")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"images have dtype {x.dtype}; expected uint8 (scaled to [0, 1]) "
            "or a float type (used as is). Convert them before batching."
        )


def _batches(x, y, order, batch_size, drop_remainder, with_ids) -> tf.data.Dataset:
    # The arrays enter TensorFlow in their stored dtype; only the gathered
    # batch is converted, so no float copy of the whole dataset is made.
    images = tf.convert_to_tensor(x)
    labels = tf.convert_to_tensor(np.asarray(y, dtype=np.int64))
    scale = x.dtype == np.uint8

    def gather(batch_indices):
        batch = tf.cast(tf.gather(images, batch_indices), tf.float32)
        if scale:
            batch = batch / 255.0
        if with_ids:
            return batch, tf.gather(labels, batch_indices), batch_indices
        return batch, tf.gather(labels, batch_indices)

    dataset = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
