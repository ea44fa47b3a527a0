"""Gradient arithmetic shared by the parties."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "all_finite",
    "apply_gradients",
    "compiled",
    "loss_scale",
    "optimizer_factory",
    "regularization",
    "skip_unless",
    "skipped",
    "specs_of",
    "unscale",
    "wire_dtype",
]


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


def compiled(step, run_eagerly: bool = False, jit_compile: bool = False):
    """`step` as one `tf.function` (fused parties and transport), or as is.

    `jit_compile` compiles it with XLA. The function is called through its
    concrete functions (`Dispatched`).
    """
    if run_eagerly:
        return step
    return Dispatched(
        tf.function(step, reduce_retracing=True, jit_compile=jit_compile or None)
    )


class Dispatched:
    """A `tf.function` called through the concrete function of each input
    signature it has seen, found by the arguments' nesting, shapes and
    dtypes (`_signature`). `tf.function` itself builds the arguments' full
    trace type on every call, which a small step feels: a host pays it once
    per message, a client once or twice per step (`benchmarks/dispatch.py`).
    A signature's first call goes through the `tf.function` (which traces
    it, and may make variables); so do keyword arguments, arguments
    `_signature` cannot key and `tf.config.run_functions_eagerly`. Other
    attributes are the function's.
    """

    def __init__(self, function):
        self.function = function
        self._concrete = {}

    def __call__(self, *args, **kwargs):
        key = None if kwargs or tf.config.functions_run_eagerly() else _signature(args)
        if key is None:  # arguments only tf.function knows how to key
            return self.function(*args, **kwargs)
        concrete = self._concrete.get(key)
        if concrete is not None:
            return concrete(*args)
        # A new signature: traced by the tf.function's own call (which also
        # makes variables at a first call, and enters an XLA context), then
        # its concrete function kept for the next calls.
        result = self.function(*args)
        self._concrete[key] = self.function.get_concrete_function(*args)
        return result

    def __getattr__(self, name):
        if name == "function":  # not set yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.function, name)


_VALUES = (bool, int, float, str, bytes, type(None))


def _signature(value):
    """What picks `value`'s concrete function: its nesting (tuples, lists)
    and each leaf's shape and dtype (a tensor or an array), identity, shape
    and dtype (a variable) or value (None, a number, a string); None for
    anything else."""
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        key = [type(value)]
        for item in value:
            item_key = _signature(item)
            if item_key is None:
                return None
            key.append(item_key)
        return tuple(key)
    if isinstance(value, tf.Variable):
        return ("variable", id(value), tuple(value.shape), value.dtype)
    if isinstance(value, (tf.Tensor, np.ndarray)):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, _VALUES):
        return (type(value), value)
    return None


def wire_dtype(dtype) -> tf.DType:
    """The dtype a cut tensor of `dtype` crosses the cut in: float32 for the
    16-bit compute dtypes of mixed precision, so that gradients coming back
    are float32 (a codec may still send them in 16 bits)."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def specs_of(tensors) -> list:
    """[(dtype on the wire, shape with a None batch)] of Keras tensors: what a
    host checks arriving tensors against."""
    return [
        (wire_dtype(t.dtype), [None] + [d for d in t.shape[1:]])
        for t in tf.nest.flatten(tensors)
    ]


def loss_scale(optimizer):
    """The loss scale of a `keras.optimizers.LossScaleOptimizer` (its value
    for this step, read before the update may change it), else None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.identity(optimizer.scale_loss(tf.constant(1.0)))
    return None


def all_finite(gradients) -> tf.Tensor:
    """True when no gradient (None ones skipped) holds NaN or Inf."""
    checks = [tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None]
    return tf.reduce_all(checks) if checks else tf.constant(True)


def skip_unless(finite, gradients) -> list:
    """`gradients`, or NaN in all of them when not `finite`, so that a loss
    scale optimizer skips the whole update (and backs its scale off)."""
    return [
        None if g is None else tf.where(finite, g, tf.fill(tf.shape(g), np.nan))
        for g in gradients
    ]


def unscale(gradients, scale, finite=None):
    """Gradients of a loss scaled by `scale`, unscaled in float32; all zeros
    when the step overflowed (`finite` False; by default: any of these is
    not finite): the other party must not take NaN or Inf, and knows from
    the zeros that this step was skipped."""
    if scale is None:
        return list(gradients)
    if finite is None:
        finite = all_finite(gradients)
    return [
        tf.cast(
            tf.where(
                finite, tf.cast(g, tf.float32) / scale, tf.zeros_like(g, tf.float32)
            ),
            g.dtype,
        )
        for g in gradients
    ]


def skipped(gradients) -> tf.Tensor:
    """True when every gradient that came back is exactly zero: the other
    party skipped an overflowing loss-scaled step (see `unscale`)."""
    return tf.reduce_all([tf.reduce_all(tf.equal(g, 0)) for g in gradients])
