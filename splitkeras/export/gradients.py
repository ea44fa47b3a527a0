"""Gradients made of LiteRT builtin ops, for training a segment on a device.

TensorFlow differentiates a convolution into `Conv2DBackpropFilter`, a max
pool into `MaxPoolGrad` and a ReLU into `ReluGrad`: kernels the LiteRT
runtime does not have (they would need the Flex delegate, i.e. TensorFlow on
the device). `lite_gradients` computes the same gradients with ops LiteRT
has (slices, pads, reshapes, matmuls, transposed convolutions, compares), by
overriding those ops' gradient functions while the forward pass is traced:

- ReLU / ReLU6: the incoming gradient where the output is inside (0, cap);
  LeakyReLU: scaled by alpha where the input is not positive.
- Conv2D: the kernel gradient as one matmul of the input patches (gathered
  by k*k strided slices of the padded input) with the output gradient; the
  input gradient as a transposed convolution.
- Add / Sub: the gradient summed over the broadcast axes found from static
  shapes (TensorFlow's rule needs BroadcastGradientArgs when the batch
  dimension is dynamic).
- MaxPool: for each offset of the window, a mask of the positions holding
  the window's maximum (the first one, in row-major order, as TensorFlow
  picks it), scattered back by zero-interleaving and padding.

The forward ops are Keras's own; only their gradients differ in how they are
computed (in summation order, ~1e-6 relative). Ops without a rule here keep
TensorFlow's gradient, and the LiteRT converter names any that LiteRT lacks.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

__all__ = ["OVERRIDES", "lite_gradients", "override_gradients"]

_PREFIX = "SplitkerasLite"


def _static(tensor, what):
    """The static height and width of an NHWC tensor (batch may be dynamic)."""
    height, width = tensor.shape[1], tensor.shape[2]
    if height is None or width is None:
        raise ValueError(
            f"{what}: on-device training needs static spatial dimensions, got "
            f"shape {tensor.shape}"
        )
    return int(height), int(width)


def _check_nhwc(op):
    data_format = op.get_attr("data_format")
    if data_format not in (b"NHWC", "NHWC"):
        raise ValueError(f"{op.type} {op.name}: only NHWC is supported on device")


def _pads(size, window, stride, padding):
    """(before, after) padding TensorFlow applies along one axis."""
    if padding in (b"VALID", "VALID"):
        return 0, 0
    if padding not in (b"SAME", "SAME"):
        raise ValueError(f"padding {padding!r} is not supported on device")
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _strides(op):
    strides = list(op.get_attr("strides"))
    if strides[0] != 1 or strides[3] != 1:
        raise ValueError(f"{op.type} {op.name}: batch/channel strides must be 1")
    return strides[1], strides[2]


def _window(padded, i, j, strides, out_hw):
    """padded[:, i + h*sh, j + w*sw, :] for every output position (h, w)."""
    (sh, sw), (ho, wo) = strides, out_hw
    return padded[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]


def _place(values, i, j, strides, padded_hw):
    """The inverse of `_window`: `values` put at (i + h*sh, j + w*sw), zeros
    elsewhere, in a tensor of the padded input's size.

    Zeros are interleaved by padding reshaped views (every op 4-D at most,
    as LiteRT's PAD needs), then the result is padded by the offset.
    """
    (sh, sw), (hp, wp) = strides, padded_hw
    ho, wo, channels = values.shape[1], values.shape[2], values.shape[3]
    if sw > 1:
        values = tf.reshape(values, [-1, wo, 1, channels])
        values = tf.pad(values, [[0, 0], [0, 0], [0, sw - 1], [0, 0]])
    if sh > 1:
        values = tf.reshape(values, [-1, ho, 1, wo * sw * channels])
        values = tf.pad(values, [[0, 0], [0, 0], [0, sh - 1], [0, 0]])
    values = tf.reshape(values, [-1, ho * sh, wo * sw, channels])
    height, width = ho * sh, wo * sw
    # The last window may end before the padded edge; interleaving may run past it.
    height, width = min(height, hp - i), min(width, wp - j)
    values = values[:, :height, :width, :]
    return tf.pad(values, [[0, 0], [i, hp - i - height], [j, wp - j - width], [0, 0]])


def _relu_grad(op, grad):
    y = op.outputs[0]
    return grad * tf.cast(y > 0, grad.dtype)


def _relu6_grad(op, grad):
    y = op.outputs[0]
    inside = tf.logical_and(y > 0, y < 6)
    return grad * tf.cast(inside, grad.dtype)


def _leaky_relu_grad(op, grad):
    x = op.inputs[0]
    alpha = tf.cast(op.get_attr("alpha"), grad.dtype)
    return grad * tf.where(x > 0, tf.ones_like(grad), alpha * tf.ones_like(grad))


def _conv2d_grad(op, grad):
    _check_nhwc(op)
    x, kernel = op.inputs
    if any(d != 1 for d in op.get_attr("dilations")):
        raise ValueError(f"Conv2D {op.name}: dilated convolutions are not supported")
    strides = _strides(op)
    padding = op.get_attr("padding")
    kh, kw, channels, filters = (int(d) for d in kernel.shape)
    height, width = _static(x, op.name)
    if x.shape[3] is not None and int(x.shape[3]) != channels:
        raise ValueError(f"Conv2D {op.name}: grouped convolutions are not supported")
    ho, wo = _static(op.outputs[0], op.name)
    top, bottom = _pads(height, kh, strides[0], padding)
    left, right = _pads(width, kw, strides[1], padding)
    padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    columns = [
        tf.reshape(_window(padded, i, j, strides, (ho, wo)), [-1, channels])
        for i in range(kh)
        for j in range(kw)
    ]
    patches = tf.concat(columns, axis=1)  # [batch * ho * wo, kh * kw * channels]
    flat_grad = tf.reshape(grad, [-1, filters])
    kernel_grad = tf.reshape(
        tf.matmul(patches, flat_grad, transpose_a=True), [kh, kw, channels, filters]
    )
    batch = tf.shape(grad)[0]
    input_grad = tf.nn.conv2d_transpose(
        grad,
        kernel,
        tf.stack([batch, height, width, channels]),
        strides=list(op.get_attr("strides")),
        padding=padding.decode() if isinstance(padding, bytes) else padding,
    )
    return input_grad, kernel_grad


def _max_pool_grad(op, grad):
    _check_nhwc(op)
    x, y = op.inputs[0], op.outputs[0]
    ksize = list(op.get_attr("ksize"))
    if ksize[0] != 1 or ksize[3] != 1:
        raise ValueError(f"MaxPool {op.name}: pooling over batch/channels")
    kh, kw = ksize[1], ksize[2]
    strides = _strides(op)
    padding = op.get_attr("padding")
    height, width = _static(x, op.name)
    ho, wo = _static(y, op.name)
    top, bottom = _pads(height, kh, strides[0], padding)
    left, right = _pads(width, kw, strides[1], padding)
    padded = x
    if top or bottom or left or right:
        padded = tf.pad(
            x,
            [[0, 0], [top, bottom], [left, right], [0, 0]],
            constant_values=-np.inf,
        )
    padded_hw = (height + top + bottom, width + left + right)
    taken = tf.zeros_like(y)
    input_grad = None
    for i in range(kh):
        for j in range(kw):
            hit = tf.cast(
                tf.equal(_window(padded, i, j, strides, (ho, wo)), y), grad.dtype
            )
            first = hit * (1.0 - taken)  # only the first maximum of a window
            taken = taken + first
            part = _place(first * grad, i, j, strides, padded_hw)
            input_grad = part if input_grad is None else input_grad + part
    return input_grad[:, top : top + height, left : left + width, :]


def _unbroadcast(grad, shape):
    """`grad` summed over the axes an input of static `shape` was broadcast
    along (the batch may be unknown), without BroadcastGradientArgs."""
    if shape.rank is None or grad.shape.rank is None:
        raise ValueError("on-device training needs tensors of known rank")
    dims, out = shape.as_list(), grad.shape.as_list()
    lead = len(out) - len(dims)
    for i, d in enumerate(dims):
        if d is None and (lead + i != 0 or out[lead + i] is not None):
            raise ValueError(
                f"on-device training needs static shapes (but the batch): an "
                f"input of shape {shape} meets a gradient of shape {grad.shape}"
            )
    if lead:
        grad = tf.reduce_sum(grad, axis=list(range(lead)))
    ones = [i for i, d in enumerate(dims) if d == 1 and out[lead + i] != 1]
    if ones:
        grad = tf.reduce_sum(grad, axis=ones, keepdims=True)
    return grad


def _add_grad(op, grad):
    return tuple(_unbroadcast(grad, x.shape) for x in op.inputs)


def _sub_grad(op, grad):
    x, y = op.inputs
    return _unbroadcast(grad, x.shape), -_unbroadcast(grad, y.shape)


_RULES = {
    "Add": _add_grad,
    "AddV2": _add_grad,
    "Sub": _sub_grad,
    "Relu": _relu_grad,
    "Relu6": _relu6_grad,
    "LeakyRelu": _leaky_relu_grad,
    "Conv2D": _conv2d_grad,
    "MaxPool": _max_pool_grad,
}
# op type -> the name its builtin-only gradient is registered under.
OVERRIDES = {op_type: _PREFIX + op_type for op_type in _RULES}
for _op_type, _rule in _RULES.items():
    tf.RegisterGradient(OVERRIDES[_op_type])(_rule)


@contextlib.contextmanager
def override_gradients():
    """Ops created inside (in a graph) take the builtin-only gradients."""
    graph = tf.compat.v1.get_default_graph()
    with graph.gradient_override_map(OVERRIDES):
        yield


def lite_gradients(segment, inputs, output_gradients) -> list:
    """The gradients of `segment.trainable_variables` for one training step.

    Runs `segment` on `inputs` in training mode (inside a `tf.function`) with
    builtin-only gradient rules and returns the gradients of
    sum(outputs * output_gradients) + the segment's regularization losses
    (None for a variable the outputs do not depend on), as `Client.backward`
    computes them. Each output is cast to its gradient's dtype first (16-bit
    cut tensors cross in float32, and their gradients come back in it).
    """
    if tf.executing_eagerly():
        raise RuntimeError("lite_gradients runs inside a tf.function")
    seeds = list(output_gradients)
    with override_gradients():
        outputs = tf.nest.flatten(segment(inputs, training=True))
        targets = [tf.cast(t, g.dtype) for t, g in zip(outputs, seeds)]
        losses = list(segment.losses)
    if losses:
        regularization = tf.add_n(losses)
        targets.append(regularization)
        seeds.append(tf.ones_like(regularization))
    variables = [v.value for v in segment.trainable_variables]
    return tf.gradients(targets, variables, grad_ys=seeds)
