"""Micro-batched steps (`config.train.microbatches`, GPipe style).

A client cuts its batch of N rows into M micro-batches and sends them
without waiting; the receiving party handles each as it arrives and answers
its gradients, but applies one optimizer update per step. Each micro-batch
contributes its share of the batch's loss: its own mean loss times its rows
over N. The shares' gradients add up to the gradient of the batch's mean
loss, so the step makes the unpipelined step's update (up to the order of
float additions). Batch statistics (batch normalization) are the one thing
that differs: they are computed per micro-batch.

`pieces(N, M)` gives the rows of each micro-batch; `share(...)` the weight of
a micro-batch's loss; `GradientSums` the receiver's running sums.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["GradientSums", "is_piece", "last_piece", "pieces", "share"]


def pieces(rows, count: int) -> list:
    """[(first, end)] row bounds of `count` micro-batches of `rows` rows.

    Sizes differ by at most one. When `rows` < `count` the first pieces are
    empty (the sender skips them); the last one never is.
    """
    return [((i * rows) // count, ((i + 1) * rows) // count) for i in range(count)]


def is_piece(message) -> bool:
    """The message carries one micro-batch of a step (not a whole batch)."""
    rows = message.rows
    return not (isinstance(rows, int) and rows == 0)


def _rows(message):
    return tf.shape(message.tensors[0], out_type=tf.int64)[0]


def share(message, dtype=tf.float32):
    """A micro-batch's share of its step's batch: its rows / the step's."""
    return tf.cast(_rows(message), dtype) / tf.cast(message.rows, dtype)


def last_piece(message):
    """True (a bool tensor) for the step's last micro-batch."""
    end = tf.cast(message.offset, tf.int64) + _rows(message)
    return tf.equal(end, tf.cast(message.rows, tf.int64))


class GradientSums:
    """A party's gradient sums over a step's micro-batches.

    `add(grads, last, apply)` adds one micro-batch's gradients; with the
    last one it calls `apply(sums)` (the one optimizer update of the step)
    and starts again from zero. The sums live in variables so that a host,
    which answers each micro-batch in its own call, keeps them between calls.
    """

    def __init__(self, variables):
        with tf.init_scope():  # also when first used inside a tf.function
            self.sums = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                for v in variables
            ]

    def add(self, grads, last, apply) -> tf.Tensor:
        # A variable without a gradient (unused by the loss) gets none in
        # the update either, as in the unpipelined step.
        used = [(s, g) for s, g in zip(self.sums, grads) if g is not None]

        def finish():
            totals = iter([s + g for s, g in used])
            apply([None if g is None else next(totals) for g in grads])
            self.reset([s for s, _ in used])
            return tf.constant(True)

        def keep():
            for s, g in used:
                s.assign_add(g)
            return tf.constant(False)

        return tf.cond(last, finish, keep)

    def reset(self, sums=None) -> None:
        """Forgets a step's partial sums (its micro-batches are sent again)."""
        for s in self.sums if sums is None else sums:
            s.assign(tf.zeros_like(s))
