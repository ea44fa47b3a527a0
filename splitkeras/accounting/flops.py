"""Per-example FLOPs of a Keras model or segment, counted from its layers.

Split learning's case is client compute: `count_flops(cut(model, at).client)`
is what one client spends per example, `count_flops(model)` what a federated
client spends. Counts are per example (batch 1) and come from the static
shapes of every layer call, so a segment (whose inputs are intermediate
tensors) counts like any functional model, and the segments of a cut add up
to the whole model.

Forward conventions (1 multiply-add = 2 FLOPs, as TensorFlow's profiler):

- Conv1D/2D/3D: ``2 * out_elements * kh * kw * C_in / groups``;
  DepthwiseConv: ``2 * out_elements * kh * kw``; SeparableConv: depthwise +
  pointwise; ConvTranspose: ``2 * in_elements * kh * kw * C_out``. Dense:
  ``2 * in * units`` per position. A bias adds 1 per output element.
- A fused activation (``activation="relu"``) and activation layers (ReLU,
  LeakyReLU, PReLU, ELU, Activation): 1 per element; softmax 5 per element
  (the profiler's figure); linear 0.
- BatchNormalization: 4 per element (subtract the mean, divide by the
  standard deviation, scale, shift); per-channel constants are not counted.
  Rescaling and Normalization: 2 per element.
- Max/average pooling: pool area per output element; global pooling: 1 per
  input element. Add, Subtract, Multiply, Maximum, Minimum: (inputs - 1) per
  output element; Average: inputs per output element.
- 0: InputLayer, Flatten, Reshape, Permute, Concatenate, Identity, dropout
  and noise layers (identity at inference), ZeroPadding, Cropping.

TensorFlow's profiler (``tf.compat.v1.profiler`` with ``float_operation()``
on the frozen forward graph) counts Conv2D, DepthwiseConv2dNative, MatMul,
BiasAdd, pooling, Mean, Add and Softmax exactly as above. It has no
statistic for Relu (or any other activation), so it counts them 0; and it
sees batch normalization as TensorFlow runs it, ``x * a + b`` with ``a`` and
``b`` computed per channel: 2 per element + 6 per channel. Measured forward
FLOPs, ours / profiler: LeNet-5 852,370 / 845,862; VGG-11 at width 0.25
20,647,434 / 20,536,874; both differences are exactly those two items.

Backward: a layer computes the gradient with respect to its inputs (about its
forward FLOPs) and, if it has trainable weights, with respect to them (about
its forward FLOPs again). By default every layer computes both: 2x forward
for layers with trainable weights, 1x for the others (the standard
estimate; right for a server segment, which sends dL/d(cut) back). With
``input_gradient=False`` (a model or client segment fed raw data) tensors
that depend on no trainable weight need no gradient, so the first weighted
layer costs 1x (weights only) and weightless layers before it 0. Training =
forward + backward.

Layers the counter does not know are listed in `FlopsReport.not_counted` as
``"name (ClassName)"`` and count 0: those with weights are missing FLOPs, so
check the list. Nested models are counted layer by layer (``outer/inner``).
"""

from __future__ import annotations

import dataclasses
import math

import keras

__all__ = ["FlopsReport", "LayerFlops", "count_flops", "training_flops"]

_L = keras.layers
_SOFTMAX_FLOPS = 5  # per element: the profiler's figure (exp, sum, divide...)
_BATCH_NORM_FLOPS = 4  # per element: subtract, divide, scale, shift
_ACTIVATIONS = (_L.ReLU, _L.LeakyReLU, _L.PReLU, _L.ELU, _L.Activation, _L.Softmax)
_POOLS = (
    *(_L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D),
    *(_L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D),
)
_GLOBAL_POOLS = (
    *(_L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D),
    *(_L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D),
    _L.GlobalAveragePooling3D,
)
_TRANSPOSED = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
_PAIRWISE = (_L.Add, _L.Subtract, _L.Multiply, _L.Maximum, _L.Minimum)
_FREE = (
    *(_L.InputLayer, _L.Flatten, _L.Reshape, _L.Permute, _L.Concatenate),
    *(_L.Identity, _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D),
    *(_L.SpatialDropout3D, _L.GaussianDropout, _L.AlphaDropout, _L.GaussianNoise),
    *(_L.ActivityRegularization, _L.ZeroPadding1D, _L.ZeroPadding2D),
    *(_L.ZeroPadding3D, _L.Cropping1D, _L.Cropping2D, _L.Cropping3D),
)


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One layer call: its name, class name and per-example FLOPs."""

    name: str
    kind: str
    forward: int
    backward: int


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-example FLOPs of a model, layer call by layer call.

    Attributes:
      layers: every layer call in graph order (inputs first).
      not_counted: ``"name (ClassName)"`` of the calls the counter does not
        know; they count 0 in `layers`.
    """

    layers: tuple[LayerFlops, ...]
    not_counted: tuple[str, ...]

    @property
    def forward(self) -> int:
        return sum(layer.forward for layer in self.layers)

    @property
    def backward(self) -> int:
        return sum(layer.backward for layer in self.layers)

    @property
    def training(self) -> int:
        """Forward + backward FLOPs of one training example."""
        return self.forward + self.backward


def _elements(shape, where: str) -> int:
    if any(d is None for d in shape[1:]):
        raise ValueError(
            f"{where} has shape {tuple(shape)}: FLOPs need every dimension but "
            "the batch; build the model with a fixed input_shape, e.g. "
            "keras.Input((32, 32, 3))."
        )
    return math.prod(shape[1:])


def _activation(function, elements: int) -> int:
    name = getattr(function, "__name__", "linear")
    if name == "linear":
        return 0
    return (_SOFTMAX_FLOPS if name == "softmax" else 1) * elements


def _channels(layer, shape) -> int:
    first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return shape[1] if first else shape[-1]


def _weighted(layer, ins: list[int], out: int, in_shape) -> int | None:
    """FLOPs of a convolution or Dense (bias and activation included)."""
    kernel = math.prod(getattr(layer, "kernel_size", ()))
    if isinstance(layer, (_L.Conv1D, _L.Conv2D, _L.Conv3D)):
        macs = out * kernel * _channels(layer, in_shape) // layer.groups
    elif isinstance(layer, (_L.DepthwiseConv1D, _L.DepthwiseConv2D)):
        macs = out * kernel
    elif isinstance(layer, (_L.SeparableConv1D, _L.SeparableConv2D)):
        depth = _channels(layer, in_shape) * layer.depth_multiplier
        macs = out // layer.filters * depth * (kernel + layer.filters)
    elif isinstance(layer, _TRANSPOSED):
        macs = ins[0] * kernel * layer.filters
    elif isinstance(layer, _L.Dense):
        macs = out * in_shape[-1]
    else:
        return None
    bias = out if layer.use_bias else 0
    return 2 * macs + bias + _activation(layer.activation, out)


def _forward(layer, ins: list[int], out: int, in_shape) -> int | None:
    """Forward FLOPs of one call of `layer`, or None if it is not known."""
    if isinstance(layer, _ACTIVATIONS):
        if isinstance(layer, _L.Softmax):
            return _SOFTMAX_FLOPS * out
        if isinstance(layer, _L.Activation):
            return _activation(layer.activation, out)
        return out
    if isinstance(layer, _L.BatchNormalization):
        return _BATCH_NORM_FLOPS * out
    if isinstance(layer, (_L.Rescaling, _L.Normalization)):
        return 2 * out
    if isinstance(layer, _POOLS):
        return math.prod(layer.pool_size) * out
    if isinstance(layer, _GLOBAL_POOLS):
        return ins[0]
    if isinstance(layer, _PAIRWISE):
        return (len(ins) - 1) * out
    if isinstance(layer, _L.Average):
        return len(ins) * out
    if isinstance(layer, _FREE):
        return 0
    return _weighted(layer, ins, out, in_shape)


def _producer(tensor):
    operation, node_index, _ = tensor._keras_history
    return None if operation is None else operation._inbound_nodes[node_index]


def _nodes(model: keras.Model) -> list:
    """The layer calls between `model`'s inputs and outputs, inputs first."""
    inputs = {id(t) for t in model.inputs}

    def producers(tensors):
        found = (_producer(t) for t in tensors if id(t) not in inputs)
        return [n for n in found if n is not None and not n.is_input]

    order, seen = [], set()
    stack = [(n, False) for n in reversed(producers(model.outputs))]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in reversed(producers(node.input_tensors)))
    return order


def count_flops(model: keras.Model, input_gradient: bool = True) -> FlopsReport:
    """Counts the per-example forward and backward FLOPs of `model`.

    Args:
      model: a built functional or Sequential model, or a segment from
        `splitkeras.cut`; every dimension but the batch must be known.
      input_gradient: whether backpropagation reaches the model's inputs.
        True (the standard estimate): every layer computes its input
        gradient. False, for a model or client segment fed raw data: layers
        that depend on no trainable weight skip it (see the module docstring).

    Returns:
      A `FlopsReport`, per example (batch 1).

    Raises:
      ValueError: the model has no symbolic inputs, or a layer's shape has an
        unknown dimension besides the batch.
    """
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"model '{model.name}' has no symbolic inputs: build it as a "
            "functional or Sequential model with a keras.Input before counting."
        )
    needs_gradient = {id(t): input_gradient for t in model.inputs}
    layers, not_counted = [], []
    for node in _nodes(model):
        layer = node.operation
        upstream = any(needs_gradient.get(id(t), False) for t in node.input_tensors)
        trainable = bool(getattr(layer, "trainable_weights", ()))
        for t in node.output_tensors:
            needs_gradient[id(t)] = trainable or upstream
        if isinstance(layer, keras.Model):
            inner = count_flops(layer, input_gradient=upstream)
            layers += [_nested(layer.name, entry) for entry in inner.layers]
            not_counted += [f"{layer.name}/{name}" for name in inner.not_counted]
            continue
        where = f"layer '{layer.name}' of model '{model.name}'"
        ins = [_elements(t.shape, where) for t in node.input_tensors]
        out = _elements(node.output_tensors[0].shape, where)
        forward = _forward(layer, ins, out, node.input_tensors[0].shape)
        if forward is None:
            not_counted.append(f"{layer.name} ({type(layer).__name__})")
            forward = 0
        backward = forward * (int(trainable) + int(upstream))
        layers.append(LayerFlops(layer.name, type(layer).__name__, forward, backward))
    return FlopsReport(tuple(layers), tuple(not_counted))


def _nested(prefix: str, entry: LayerFlops) -> LayerFlops:
    return dataclasses.replace(entry, name=f"{prefix}/{entry.name}")


def training_flops(
    model: keras.Model, examples: int, epochs: int = 1, input_gradient: bool = True
) -> int:
    """Training FLOPs (forward + backward) of `model` over a whole run.

    Args:
      model: as for `count_flops`.
      examples: training examples per epoch.
      epochs: passes over the examples.
      input_gradient: as for `count_flops`.

    Returns:
      ``count_flops(model, input_gradient).training * examples * epochs``.

    Raises:
      ValueError: `examples` or `epochs` is negative, or as `count_flops`.
    """
    if examples < 0 or epochs < 0:
        raise ValueError(
            f"training_flops needs examples >= 0 and epochs >= 0; got "
            f"examples={examples}, epochs={epochs}."
        )
    report = count_flops(model, input_gradient=input_gradient)
    return report.training * examples * epochs
