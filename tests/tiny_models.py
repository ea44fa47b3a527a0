"""Tiny models with the features the parity tests need."""

import keras


def bn_dropout_model(seed=0):
    """Conv + BatchNorm + Dropout + L2 regularizer, 8x8x1 -> 3 logits."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    h = keras.layers.Dense(16, activation="relu", kernel_regularizer="l2", name="fc1")(
        h
    )
    h = keras.layers.Dropout(0.2, name="drop2")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    return keras.Model(inp, out, name="bn_dropout")


def skip_model(seed=0):
    """A residual block whose skip connection crosses a cut at 'conv_b'."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    h = keras.layers.ReLU(name="stem_relu")(h)
    b = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv_a")(h)
    b = keras.layers.BatchNormalization(name="bn_a")(b)
    b = keras.layers.ReLU(name="relu_a")(b)
    b = keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(b)
    h = keras.layers.Add(name="add")([h, b])
    h = keras.layers.ReLU(name="block_out")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(8, activation="relu", name="fc1")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    return keras.Model(inp, out, name="skip")
