"""CIFAR-style VGG (Simonyan & Zisserman, 2015) as a functional model."""

from __future__ import annotations

import types

import keras

__all__ = ["VGG_CONFIGS", "VGG_DEFAULT_CUT", "vgg"]

# Filters of each conv layer, one tuple per block; every block ends in a 2x2
# max pool. Configurations A (11), B (13), D (16) and E (19) of the paper.
VGG_CONFIGS = types.MappingProxyType(
    {
        11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
        13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
        16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
        19: (
            (64, 64),
            (128, 128),
            (256, 256, 256, 256),
            (512, 512, 512, 512),
            (512, 512, 512, 512),
        ),
    }
)

# Right after the first convolution: the client runs a single conv layer.
VGG_DEFAULT_CUT = "block1_relu1"

_FC_UNITS = 512  # CIFAR-style head; the ImageNet VGG uses 4096.


def _conv_block(x, block: int, filters: tuple[int, ...], batch_norm: bool):
    layers = keras.layers
    for i, f in enumerate(filters, start=1):
        x = layers.Conv2D(
            f, 3, padding="same", use_bias=not batch_norm, name=f"block{block}_conv{i}"
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"block{block}_bn{i}")(x)
        x = layers.ReLU(name=f"block{block}_relu{i}")(x)
    return layers.MaxPooling2D(2, name=f"block{block}_pool")(x)


def _check_args(depth, input_shape, dropout, width):
    if depth not in VGG_CONFIGS:
        raise ValueError(
            f"vgg depth {depth!r} is not supported; use one of {sorted(VGG_CONFIGS)}."
        )
    min_size = 2 ** len(VGG_CONFIGS[depth])
    if min(input_shape[0], input_shape[1]) < min_size:
        raise ValueError(
            f"vgg input_shape {tuple(input_shape)} is too small: the "
            f"{len(VGG_CONFIGS[depth])} pooling stages need height and width "
            f">= {min_size}; resize the images."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"vgg dropout {dropout!r} must be in [0, 1).")
    if width <= 0:
        raise ValueError(f"vgg width {width!r} must be > 0 (1.0 is the paper).")


def vgg(
    depth: int = 16,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    batch_norm: bool = True,
    dropout: float = 0.5,
    width: float = 1.0,
    name: str | None = None,
) -> keras.Model:
    """Builds a CIFAR-style VGG-11/13/16/19.

    Each convolution is ``block{b}_conv{i}`` (3x3, same) ->
    ``block{b}_bn{i}`` (if `batch_norm`) -> ``block{b}_relu{i}``; each block
    ends in ``block{b}_pool`` (max 2x2). The head is ``flatten`` -> ``fc1``
    (512, relu) -> ``drop1`` -> ``fc2`` (512, relu) -> ``drop2`` -> ``logits``.

    The default cut is ``"block1_relu1"`` (`VGG_DEFAULT_CUT`); for a 32x32x3
    input its output is 32x32x(64 * width).

    Args:
      depth: number of weight layers: 11, 13, 16 or 19.
      input_shape: ``(height, width, channels)``, channels last; height and
        width must be at least 32 (five 2x2 poolings).
      num_classes: number of output logits.
      batch_norm: add BatchNormalization after every convolution (the convs
        then have no bias, which BN would cancel).
      dropout: dropout rate of ``drop1`` and ``drop2``.
      width: multiplier for the conv filter counts (rounded, at least 1);
        below 1.0 for tiny test models. The 512-unit head is not scaled.
      name: model name; defaults to ``f"vgg{depth}"``.

    Returns:
      A functional `keras.Model` mapping images to unnormalized logits of shape
      ``(batch, num_classes)``.

    Raises:
      ValueError: for an unsupported depth, an input smaller than 32x32, a
        dropout outside [0, 1) or a non-positive width.
    """
    _check_args(depth, input_shape, dropout, width)
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for block, filters in enumerate(VGG_CONFIGS[depth], start=1):
        scaled = tuple(max(1, round(f * width)) for f in filters)
        x = _conv_block(x, block, scaled, batch_norm)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_FC_UNITS, activation="relu", name="fc1")(x)
    x = layers.Dropout(dropout, name="drop1")(x)
    x = layers.Dense(_FC_UNITS, activation="relu", name="fc2")(x)
    x = layers.Dropout(dropout, name="drop2")(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name or f"vgg{depth}")
