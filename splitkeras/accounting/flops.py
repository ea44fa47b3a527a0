"""Training FLOPs of a Keras model or segment, counted from its layers.

Conventions (per example, batch 1):
- 1 multiply-add = 2 FLOPs, as TensorFlow's profiler counts.
- Conv2D: 2 * H_out * W_out * C_out * kh * kw * C_in / groups, + 1 per
  output element for the bias; DepthwiseConv2D likewise per channel.
- Dense: 2 * inputs * units (+ units for the bias); applied to the last axis.
- A fused activation (e.g. activation="relu"): + 1 per output element.
- BatchNormalization: 4 per element (normalize, scale, shift at inference
  form); ReLU / Activation / LeakyReLU: 1 per element; softmax: 5 per element.
- Max/average pooling: kernel area per output element; global pooling: 1 per
  input element. Add / Subtract / Multiply / Average / Maximum: (inputs - 1)
  per output element. Concatenate, Flatten, Reshape, Dropout, padding,
  cropping, InputLayer: 0.
- Backward = 2 x forward for layers with weights (gradients for the inputs
  and the weights), 1 x forward for layers without. Training = forward +
  backward.

Layers with weights the counter does not know go to `not_counted` (their
FLOPs are missing from the totals); unknown layers without weights count 0
and are listed too.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

__all__ = ["FlopsReport", "LayerFlops", "count_flops", "training_flops"]

_ZERO = (
    keras.layers.InputLayer,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Dropout,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Concatenate,
)
_MERGE = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    name: str
    kind: str
    forward: int
    backward: int


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-example FLOPs of a model, layer by layer."""

    layers: tuple
    not_counted: tuple

    @property
    def forward(self) -> int:
        return sum(layer.forward for layer in self.layers)

    @property
    def backward(self) -> int:
        return sum(layer.backward for layer in self.layers)

    @property
    def training(self) -> int:
        return self.forward + self.backward


def _size(shape) -> int:
    return int(np.prod([d for d in shape[1:]]))


def _activation_flops(layer, out_elems) -> int:
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", "linear")
    if name == "linear":
        return 0
    return (5 if name == "softmax" else 1) * out_elems


def _conv(layer, in_shape, out_shape) -> int:
    out_elems = _size(out_shape)
    kernel = int(np.prod(layer.kernel_size))
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        macs = out_elems * kernel
    else:
        c_in = in_shape[-1] // getattr(layer, "groups", 1)
        macs = out_elems * kernel * c_in
    bias = out_elems if layer.use_bias else 0
    return 2 * macs + bias + _activation_flops(layer, out_elems)


def _dense(layer, in_shape, out_shape) -> int:
    out_elems = _size(out_shape)
    macs = out_elems * in_shape[-1]
    bias = out_elems if layer.use_bias else 0
    return 2 * macs + bias + _activation_flops(layer, out_elems)


def _forward(layer, in_shapes, out_shape):
    """Forward FLOPs of one call, or None if the layer is not known."""
    out_elems = _size(out_shape)
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
        return _conv(layer, in_shapes[0], out_shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return _conv(layer, in_shapes[0], out_shape)
    if isinstance(layer, keras.layers.Dense):
        return _dense(layer, in_shapes[0], out_shape)
    if isinstance(layer, keras.layers.BatchNormalization):
        return 4 * out_elems
    if isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU)):
        return out_elems
    if isinstance(layer, keras.layers.Activation):
        return _activation_flops(layer, out_elems) or out_elems
    if isinstance(layer, keras.layers.Softmax):
        return 5 * out_elems
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        return int(np.prod(layer.pool_size)) * out_elems
    if isinstance(
        layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
    ):
        return _size(in_shapes[0])
    if isinstance(layer, _MERGE):
        return (len(in_shapes) - 1) * out_elems
    if isinstance(layer, _ZERO):
        return 0
    return None


def _model_nodes(model) -> list:
    """The layer calls of `model`: the graph between its inputs and outputs."""
    seen, stack = {}, list(model.outputs)
    inputs = {id(t) for t in model.inputs}
    while stack:
        tensor = stack.pop()
        if id(tensor) in inputs:
            continue
        op, index, _ = tensor._keras_history
        if op is None:
            continue
        node = op._inbound_nodes[index]
        if id(node) not in seen:
            seen[id(node)] = node
            stack.extend(node.input_tensors)
    return list(seen.values())


def count_flops(model: keras.Model) -> FlopsReport:
    """Per-example forward/backward FLOPs of `model` (or a segment)."""
    layers, not_counted = [], []
    for node in _model_nodes(model):
        layer = node.operation
        in_shapes = [t.shape for t in node.input_tensors]
        out_shape = node.output_tensors[0].shape
        forward = _forward(layer, in_shapes, out_shape)
        if forward is None:
            not_counted.append(f"{layer.name} ({type(layer).__name__})")
            forward = 0
        weighted = bool(getattr(layer, "trainable_weights", []))
        backward = (2 if weighted else 1) * forward
        layers.append(LayerFlops(layer.name, type(layer).__name__, forward, backward))
    return FlopsReport(tuple(layers), tuple(not_counted))


def training_flops(model: keras.Model, examples: int, epochs: int = 1) -> int:
    """Training FLOPs (forward + backward) for `examples` x `epochs`."""
    return count_flops(model).training * examples * epochs
