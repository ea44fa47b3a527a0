"""Gradient arithmetic shared by the parties."""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["apply_gradients", "compiled", "optimizer_factory", "regularization"]


def regularization(*segments):
    """Sum of the segments' own losses (weight and activity regularizers).

    Each party adds the regularization of its own layers to its objective, so
    the total gradient equals that of the uncut model's loss.
    """
    losses = [loss for s in segments if s is not None for loss in s.losses]
    return tf.add_n(losses) if losses else None


def apply_gradients(optimizer, gradients, variables):
    """Applies `gradients` with `optimizer`, skipping variables without one."""
    pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
    if pairs:
        optimizer.apply_gradients(pairs)


def optimizer_factory(make_optimizer):
    """A zero-argument optimizer factory from a factory or an optimizer name.

    Every party needs its own optimizer instance; a name such as "adam"
    becomes a factory that builds a fresh one per call.
    """
    if callable(make_optimizer):
        return make_optimizer
    return lambda: keras.optimizers.get(make_optimizer)


def compiled(step, run_eagerly: bool = False):
    """`step` as one `tf.function` (fused parties and transport), or as is."""
    return step if run_eagerly else tf.function(step, reduce_retracing=True)
