"""AlexNet (Krizhevsky et al., 2012) as a single-tower functional model."""

from __future__ import annotations

import math

import keras

__all__ = ["ALEXNET_DEFAULT_CUT", "alexnet"]

# The first conv block (conv1 + pool1) stays with the client.
ALEXNET_DEFAULT_CUT = "pool1"

# (conv name, filters, kernel size, stride, name of the 3x3/2 max pool after it)
_CONVS = (
    ("conv1", 96, 11, 4, "pool1"),
    ("conv2", 256, 5, 1, "pool2"),
    ("conv3", 384, 3, 1, None),
    ("conv4", 384, 3, 1, None),
    ("conv5", 256, 3, 1, "pool5"),
)
_FC_UNITS = 4096


def _pool5_size(size: int) -> int:
    """Spatial size after pool5 for an input side of `size` pixels."""
    size = math.ceil(size / 4)  # conv1, stride 4, "same"
    num_pools = sum(1 for *_, pool_name in _CONVS if pool_name)
    for _ in range(num_pools):  # valid 3x3 pools with stride 2
        size = (size - 3) // 2 + 1
    return size


def alexnet(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    num_classes: int = 1000,
    dropout: float = 0.5,
    name: str = "alexnet",
) -> keras.Model:
    """Builds the 5-conv + 3-FC AlexNet, without LRN or batch normalization.

    Layers: ``conv1`` (96, 11x11, stride 4) -> ``pool1`` -> ``conv2`` (256,
    5x5) -> ``pool2`` -> ``conv3`` (384, 3x3) -> ``conv4`` (384, 3x3) ->
    ``conv5`` (256, 3x3) -> ``pool5`` -> ``flatten`` -> ``fc6`` (4096) ->
    ``drop6`` -> ``fc7`` (4096) -> ``drop7`` -> ``logits``. Convolutions use
    "same" padding and ReLU; pools are 3x3 with stride 2 ("valid",
    overlapping). At 224x224 this gives the paper's 27 -> 13 -> 6 feature
    maps and a 9216-wide flatten.

    Where it differs from Krizhevsky et al. (2012): conv1's "same" padding
    gives 56x56 maps where the paper's 224 -> 55 arithmetic does not add up
    (pool1 is 27x27 either way); local response normalization is left out
    (Keras has no LRN layer, and later work found it adds little); the two
    GPU towers are one; weights start from Keras's Glorot-uniform and zero
    biases rather than N(0, 0.01) and biases of 1, which need the paper's
    hand-tuned schedule to get going.

    The default cut is ``"pool1"`` (`ALEXNET_DEFAULT_CUT`); for a 224x224x3
    input its output is 27x27x96.

    Args:
      input_shape: ``(height, width, channels)``, channels last. Height and
        width must be at least 57, the smallest size for which pool5 is 1x1.
      num_classes: number of output logits.
      dropout: dropout rate of ``drop6`` and ``drop7``.
      name: model name.

    Returns:
      A functional `keras.Model` mapping images to unnormalized logits of shape
      ``(batch, num_classes)``.

    Raises:
      ValueError: if the input is smaller than 57x57 or dropout is outside
        [0, 1).
    """
    if min(_pool5_size(input_shape[0]), _pool5_size(input_shape[1])) < 1:
        raise ValueError(
            f"alexnet input_shape {tuple(input_shape)} is too small: pool5 "
            "would be empty; height and width must be >= 57. Resize the images."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"alexnet dropout {dropout!r} must be in [0, 1).")
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for conv_name, filters, kernel, stride, pool_name in _CONVS:
        x = layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            activation="relu",
            name=conv_name,
        )(x)
        if pool_name:
            x = layers.MaxPooling2D(3, strides=2, name=pool_name)(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_FC_UNITS, activation="relu", name="fc6")(x)
    x = layers.Dropout(dropout, name="drop6")(x)
    x = layers.Dense(_FC_UNITS, activation="relu", name="fc7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)
