"""Builds zoo models by name and gives each one's default cut layer."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from splitkeras.models.alexnet import ALEXNET_DEFAULT_CUT, alexnet
from splitkeras.models.lenet import LENET5_DEFAULT_CUT, lenet5
from splitkeras.models.resnet import (
    RESNET18_DEFAULT_CUT,
    RESNET50_DEFAULT_CUT,
    resnet18,
    resnet50,
)
from splitkeras.models.vgg import VGG_DEFAULT_CUT, vgg

__all__ = ["available_models", "build_model", "default_cut", "default_tail_cut"]


class _Entry(NamedTuple):
    builder: Callable[..., keras.Model]
    fixed: dict[str, Any]  # arguments implied by the name, e.g. VGG depth
    cut: str
    tail_cut: str  # U-shaped: the tail (on the client) is every layer after it


_ZOO = types.MappingProxyType(
    {
        "lenet5": _Entry(lenet5, {}, LENET5_DEFAULT_CUT, "fc2"),
        **{
            f"vgg{d}": _Entry(vgg, {"depth": d}, VGG_DEFAULT_CUT, "drop2")
            for d in (11, 13, 16, 19)
        },
        "alexnet": _Entry(alexnet, {}, ALEXNET_DEFAULT_CUT, "drop7"),
        "resnet18": _Entry(resnet18, {}, RESNET18_DEFAULT_CUT, "avg_pool"),
        "resnet50": _Entry(resnet50, {}, RESNET50_DEFAULT_CUT, "avg_pool"),
    }
)


def _entry(name: str) -> _Entry:
    if name not in _ZOO:
        raise ValueError(
            f"unknown model {name!r}; available models are: "
            f"{', '.join(available_models())}."
        )
    return _ZOO[name]


def available_models() -> list[str]:
    """Returns the names `build_model` accepts, in zoo order."""
    return list(_ZOO)


def default_cut(name: str) -> str:
    """Returns the documented default cut layer of zoo model `name`.

    The client keeps every layer up to and including this one. Configs should
    still name their cut explicitly; this is the starting point.

    Args:
      name: a name from `available_models()`.

    Returns:
      The layer name, e.g. ``"pool1"`` for ``"lenet5"``.

    Raises:
      ValueError: if `name` is not a zoo model; the message lists the names.
    """
    return _entry(name).cut


def default_tail_cut(name: str) -> str:
    """Returns the default second cut of zoo model `name` for a U-shaped
    split: the layer before its `logits` layer, so the label holder keeps
    the classifier (and the loss) and the server the body in between.

    Raises:
      ValueError: if `name` is not a zoo model; the message lists the names.
    """
    return _entry(name).tail_cut


def build_model(
    name: str,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> keras.Model:
    """Builds zoo model `name` with fresh random weights.

    Args:
      name: a name from `available_models()`: ``lenet5``, ``vgg11``,
        ``vgg13``, ``vgg16``, ``vgg19``, ``alexnet``, ``resnet18`` or
        ``resnet50``.
      input_shape: ``(height, width, channels)``; ``None`` for the family's
        default (28x28x1 for LeNet-5, 32x32x3 for VGG and ResNet-18,
        224x224x3 for AlexNet and ResNet-50).
      num_classes: number of logits; ``None`` for the family's default (10,
        or 1000 for AlexNet and ResNet-50).
      **kwargs: further arguments of the family builder, e.g. ``width=0.25``
        for VGG and ResNet-18, ``dropout`` for VGG and AlexNet, ``name``.

    Returns:
      A functional `keras.Model` that outputs logits.

    Raises:
      ValueError: for an unknown name, or a keyword the name already fixes
        (``depth`` for a VGG).
    """
    entry = _entry(name)
    clash = sorted(set(kwargs) & set(entry.fixed))
    if clash:
        got = ", ".join(f"{k}={kwargs[k]!r}" for k in clash)
        raise ValueError(
            f"model {name!r} already fixes {', '.join(clash)} (got {got}); "
            f"choose the variant by name instead: {', '.join(available_models())}."
        )
    args = {**entry.fixed, **kwargs}
    if input_shape is not None:
        args["input_shape"] = tuple(input_shape)
    if num_classes is not None:
        args["num_classes"] = num_classes
    return entry.builder(**args)
