"""Per-example rows of a batch's tensors, shared by the privacy modules."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["flat_batch"]


def flat_batch(tensors) -> tf.Tensor:
    """One [batch, features] float matrix from a tensor or a list of them."""
    tensors = tf.nest.flatten(tensors)
    rows = [tf.reshape(tf.cast(t, tf.float32), [tf.shape(t)[0], -1]) for t in tensors]
    return rows[0] if len(rows) == 1 else tf.concat(rows, axis=1)
