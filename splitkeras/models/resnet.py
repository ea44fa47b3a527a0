"""ResNets (He et al., 2016): CIFAR ResNet-18 and ImageNet ResNet-50."""

from __future__ import annotations

import keras

__all__ = ["RESNET18_DEFAULT_CUT", "RESNET50_DEFAULT_CUT", "resnet18", "resnet50"]

# After the stem: the client runs one conv + BN + ReLU, and nothing but this
# tensor crosses the cut. (Cutting inside a block, e.g. at
# "stage1_block1_relu1", also sends the block's skip input "stem_relu".)
RESNET18_DEFAULT_CUT = "stem_relu"

# After the stem's max pool rather than "conv1_relu": the same client layers
# (conv1 + BN), but a 4x smaller tensor to send (56x56x64 vs 112x112x64).
RESNET50_DEFAULT_CUT = "pool1_pool"

# (filters, stride of the first block) per stage; two basic blocks per stage.
_RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
_BLOCKS_PER_STAGE = 2


def _basic_block(x, filters: int, stride: int, prefix: str):
    """Two 3x3 convs with BN plus a shortcut, named ``{prefix}_*``."""
    layers = keras.layers

    def conv(kernel, stride, suffix):
        return layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            name=f"{prefix}_{suffix}",
        )

    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv(1, stride, "proj_conv")(x)
        shortcut = layers.BatchNormalization(name=f"{prefix}_proj_bn")(shortcut)
    y = conv(3, stride, "conv1")(x)
    y = layers.BatchNormalization(name=f"{prefix}_bn1")(y)
    y = layers.ReLU(name=f"{prefix}_relu1")(y)
    y = conv(3, 1, "conv2")(y)
    y = layers.BatchNormalization(name=f"{prefix}_bn2")(y)
    y = layers.Add(name=f"{prefix}_add")([shortcut, y])
    return layers.ReLU(name=f"{prefix}_out")(y)


def resnet18(
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    width: float = 1.0,
    name: str = "resnet18",
) -> keras.Model:
    """Builds the CIFAR ResNet-18 (3x3 stem, no stem max pool).

    Layers: ``stem_conv`` (3x3, 64) -> ``stem_bn`` -> ``stem_relu``; four
    stages of two basic blocks (64, 128, 256, 512 filters; the first block of
    stages 2-4 has stride 2). Block ``b`` of stage ``s`` is named
    ``stage{s}_block{b}_`` + ``conv1``, ``bn1``, ``relu1``, ``conv2``, ``bn2``,
    ``add``, ``out`` (ReLU after the add), with a ``proj_conv``/``proj_bn``
    1x1 shortcut where the shape changes. Then ``avg_pool`` (global) ->
    ``logits``. The graph is flat (no nested models), so the model can be cut
    inside a block; the skip connection then crosses the cut as a second
    tensor.

    The default cut is ``"stem_relu"`` (`RESNET18_DEFAULT_CUT`); for a
    32x32x3 input its output is 32x32x(64 * width).

    Args:
      input_shape: ``(height, width, channels)``, channels last.
      num_classes: number of output logits.
      width: multiplier for all filter counts (rounded, at least 1); below 1.0
        for tiny test models.
      name: model name.

    Returns:
      A functional `keras.Model` mapping images to unnormalized logits of shape
      ``(batch, num_classes)``.

    Raises:
      ValueError: if `width` is not positive.
    """
    if width <= 0:
        raise ValueError(f"resnet18 width {width!r} must be > 0 (1.0 is the paper).")
    layers = keras.layers
    stem_filters = max(1, round(64 * width))
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(
        stem_filters, 3, padding="same", use_bias=False, name="stem_conv"
    )(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, (filters, first_stride) in enumerate(_RESNET18_STAGES, start=1):
        for b in range(1, _BLOCKS_PER_STAGE + 1):
            stride = first_stride if b == 1 else 1
            scaled = max(1, round(filters * width))
            x = _basic_block(x, scaled, stride, prefix=f"stage{s}_block{b}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def resnet50(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    num_classes: int = 1000,
    name: str = "resnet50",
) -> keras.Model:
    """Builds `keras.applications.ResNet50` (random weights) with a logits head.

    The body keeps the Keras layer names (``conv1_conv``, ``conv1_bn``,
    ``conv1_relu``, ``pool1_pool``, ``conv2_block1_1_conv``, ...,
    ``conv5_block3_out``, ``avg_pool``); the classifier is a linear Dense named
    ``logits`` (Keras calls it ``predictions``), so every zoo model ends in a
    ``logits`` layer. The parameter count is the same as Keras' ResNet50. The
    input layer is named ``input``.

    The default cut is ``"pool1_pool"`` (`RESNET50_DEFAULT_CUT`); for a
    224x224x3 input its output is 56x56x64 (8x8x64 at 32x32).

    Args:
      input_shape: ``(height, width, channels)``, channels last. Any size
        builds (strided "same" convs never reach zero), but at 32x32 the
        conv5 stage already sees 1x1 maps.
      num_classes: number of output logits.
      name: model name.

    Returns:
      A functional `keras.Model` mapping images to unnormalized logits of shape
      ``(batch, num_classes)``. No pretrained weights are loaded (no network).
    """
    inputs = keras.Input(shape=input_shape, name="input")
    body = keras.applications.ResNet50(
        include_top=False, weights=None, input_tensor=inputs, pooling="avg"
    )
    logits = keras.layers.Dense(num_classes, name="logits")(body.output)
    return keras.Model(inputs, logits, name=name)
