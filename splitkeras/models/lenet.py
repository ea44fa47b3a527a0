"""LeNet-5 (LeCun et al., 1998) for MNIST-sized inputs, as a functional model."""

from __future__ import annotations

import keras

__all__ = ["LENET5_DEFAULT_CUT", "lenet5"]

# The first conv block stays with the client: the raw image never leaves it.
LENET5_DEFAULT_CUT = "pool1"

# conv1 keeps the size ("same"), pool1 halves it, conv2 (5x5 "valid") needs at
# least 5x5 after pool1.
_MIN_INPUT_SIZE = 10


def lenet5(
    input_shape: tuple[int, int, int] = (28, 28, 1),
    num_classes: int = 10,
    name: str = "lenet5",
) -> keras.Model:
    """Builds LeNet-5 with ReLU activations and max pooling.

    Layers: ``conv1`` (6 filters 5x5, same, relu) -> ``pool1`` (max 2x2) ->
    ``conv2`` (16 filters 5x5, valid, relu) -> ``pool2`` -> ``flatten`` ->
    ``fc1`` (120, relu) -> ``fc2`` (84, relu) -> ``logits``.

    The default cut is ``"pool1"`` (`LENET5_DEFAULT_CUT`); for a 28x28x1 input
    its output is 14x14x6.

    Args:
      input_shape: ``(height, width, channels)``, channels last. Height and
        width must be at least 10.
      num_classes: number of output logits.
      name: model name.

    Returns:
      A functional `keras.Model` mapping images to unnormalized logits of shape
      ``(batch, num_classes)``.

    Raises:
      ValueError: if the input is smaller than 10x10.
    """
    height, width = input_shape[0], input_shape[1]
    if min(height, width) < _MIN_INPUT_SIZE:
        raise ValueError(
            f"lenet5 input_shape {tuple(input_shape)} is too small: conv2 needs "
            f"height and width >= {_MIN_INPUT_SIZE}; resize or pad the images."
        )
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, padding="valid", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)
