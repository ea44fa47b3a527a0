"""Extra task heads, for the multi-task configuration."""

from __future__ import annotations

import keras

__all__ = ["with_task_head"]


def with_task_head(model: keras.Model, from_layer: str, num_classes: int, name: str):
    """`model` with a second output: a Dense head of logits on `from_layer`.

    The new model shares `model`'s layers; its outputs are `[model's output,
    the new head's logits]`.

    Args:
      model: a functional model with one output.
      from_layer: the layer whose output feeds the new head.
      num_classes: the new task's number of classes.
      name: the new head's layer name.

    Raises:
      ValueError: `from_layer` is not a layer of `model`.
    """
    names = [layer.name for layer in model.layers]
    if from_layer not in names:
        raise ValueError(
            f"layer {from_layer!r} not found in model {model.name!r}; layers are: "
            f"{', '.join(names)}"
        )
    features = model.get_layer(from_layer).output
    head = keras.layers.Dense(num_classes, name=name)(features)
    return keras.Model(model.inputs, [model.outputs[0], head], name=f"{model.name}_mt")
