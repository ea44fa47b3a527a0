"""The splitkeras model zoo: functional Keras models that output logits.

Every model has stable layer names and a documented default cut layer (see
`default_cut`), so it can be split between a client and a server at any named
layer.
"""

from splitkeras.models.alexnet import alexnet
from splitkeras.models.heads import with_task_head
from splitkeras.models.lenet import lenet5
from splitkeras.models.registry import (
    available_models,
    build_model,
    default_cut,
    default_tail_cut,
)
from splitkeras.models.resnet import resnet18, resnet50
from splitkeras.models.vgg import vgg

__all__ = [
    "alexnet",
    "available_models",
    "build_model",
    "default_cut",
    "default_tail_cut",
    "lenet5",
    "resnet18",
    "resnet50",
    "vgg",
    "with_task_head",
]
