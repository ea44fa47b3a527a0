"""From a config to what a party builds: model, optimizer, loss, codecs, schedule.

Every party of a run builds what it holds from the same config with these
functions, in one process or on its own machine, so that all of them agree:
the same seeded initial weights, the same cut, the same codecs. A party
that holds no data (the server) learns the model's input shape and class
count from the config (`data_spec`), never from the dataset.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from splitkeras import learning_rate
from splitkeras import models as model_zoo
from splitkeras.cut import Segments, cut
from splitkeras.objective import Objective, metric_names
from splitkeras.transport.codec import codec_pair

__all__ = [
    "METHODS",
    "MIXED_PRECISION",
    "SPLIT_METHODS",
    "TOPOLOGIES",
    "DataSpec",
    "build_model",
    "build_segments",
    "check_method",
    "codecs",
    "cut_layers",
    "build_schedule",
    "data_spec",
    "load_data",
    "make_loss",
    "make_objective",
    "make_optimizer",
    "precision",
    "task_groups",
]

METHODS = (
    "split",
    "splitfed_v1",
    "splitfed_v2",
    "centralized",
    "fedavg",
    "large_batch_sgd",
)
SPLIT_METHODS = ("split", "splitfed_v1", "splitfed_v2")
TOPOLOGIES = ("vanilla", "ushaped", "vertical", "multihop", "multitask")
MIXED_PRECISION = ("", "mixed_float16", "mixed_bfloat16")

# Input shape and classes of datasets a server may be asked to serve without
# reading them (config.data.input_shape / num_classes override these).
KNOWN_DATASETS = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "kmnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "colorectal_histology": ((150, 150, 3), 8),
    "imagenet2012": (None, 1000),  # the side is config.data.image_size
}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: one example's shape, classes."""

    input_shape: tuple
    num_classes: int


def check_method(config) -> None:
    """Refuses an unknown `config.method` or `config.topology`, listing the known."""
    if config.method not in METHODS:
        raise ValueError(
            f"unknown config.method {config.method!r}; available: {', '.join(METHODS)}"
        )
    if config.topology not in TOPOLOGIES:
        raise ValueError(
            f"unknown config.topology {config.topology!r}; available: "
            f"{', '.join(TOPOLOGIES)}"
        )


def precision(config) -> str:
    """`config.train.mixed_precision`, checked against what the run can scale."""
    policy = config.train.get("mixed_precision", "") or ""
    if policy not in MIXED_PRECISION:
        raise ValueError(
            f"unknown config.train.mixed_precision {policy!r}; choose one of "
            f"{', '.join(repr(p) for p in MIXED_PRECISION)}"
        )
    scaled = ("split", "splitfed_v1", "splitfed_v2", "centralized")
    if policy == "mixed_float16" and (
        config.topology != "vanilla" or config.method not in scaled
    ):
        raise ValueError(
            "mixed_float16 needs loss scaling, which splitkeras does for the "
            f"vanilla topology and the methods {', '.join(scaled)} (each party "
            "scales its own backward pass); use mixed_bfloat16 (no loss "
            f"scaling needed) for method={config.method!r}, "
            f"topology={config.topology!r}"
        )
    return policy


def make_optimizer(config) -> keras.optimizers.Optimizer:
    """A fresh optimizer for one party; loss-scaled under mixed_float16."""
    name = config.train.optimizer
    kwargs = {"learning_rate": learning_rate.for_epoch(config.train, 0)}
    if config.train.get("weight_decay", 0.0):
        kwargs["weight_decay"] = config.train.weight_decay
    if name == "sgd":
        kwargs["momentum"] = config.train.momentum
    optimizer = keras.optimizers.get({"class_name": name, "config": kwargs})
    if precision(config) == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_loss() -> keras.losses.Loss:
    """The classification loss every label holder computes (logits in)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_objective(config) -> Objective:
    """A label holder's loss and running metrics (`config.train.metrics`)."""
    return Objective(make_loss(), metric_names(config))


def codecs(config) -> tuple[str, str]:
    """(activations codec, gradients codec) names from `config.transport`."""
    return codec_pair(config)


def data_spec(config, data=None) -> DataSpec:
    """The input shape and class count of `config`'s data.

    From `data` (a loaded dataset or stream) when given; else from
    `config.data.input_shape` / `config.data.num_classes`, or from the known
    shape of `config.data.name`: a server builds its segment without any
    dataset on its machine.

    Raises:
      ValueError: neither the config nor the dataset name tell them.
    """
    if data is not None:
        return DataSpec(tuple(data.input_shape), int(data.num_classes))
    shape_text = str(config.data.get("input_shape", "") or "")
    classes = int(config.data.get("num_classes", 0) or 0)
    known_shape, known_classes = KNOWN_DATASETS.get(config.data.name, (None, 0))
    if config.data.name == "imagenet2012":
        side = int(config.data.image_size)
        known_shape = (side, side, 3)
    shape = tuple(int(d) for d in shape_text.split(",") if d.strip()) or known_shape
    classes = classes or known_classes
    if not shape or not classes:
        raise ValueError(
            f"the input shape and class count of dataset {config.data.name!r} "
            "are not known without reading it; set config.data.input_shape "
            "(e.g. '28,28,1') and config.data.num_classes"
        )
    return DataSpec(shape, classes)


def build_model(config, data=None, input_shape=None) -> keras.Model:
    """The uncut model of `config`, with weights drawn from `config.seed`.

    Args:
      config: the experiment config.
      data: the dataset, or None (its spec then comes from the config).
      input_shape: overrides the data's input shape (a vertical client's
        strip of the image).
    """
    spec = data_spec(config, data)
    keras.utils.set_random_seed(config.seed)
    policy = precision(config)
    previous = keras.config.dtype_policy()
    if policy:  # layers compute in 16 bits and keep float32 weights
        keras.config.set_dtype_policy(policy)
    try:
        return model_zoo.build_model(
            config.model.name,
            input_shape=input_shape or spec.input_shape,
            num_classes=spec.num_classes,
            **dict(config.model.get("kwargs", {})),
        )
    finally:
        keras.config.set_dtype_policy(previous)


def cut_layers(config) -> str | tuple[str, ...]:
    """`config.model.cut` checked against `config.topology`; a U-shaped
    split given one cut gets the zoo model's default tail cut as its second
    (`models.default_tail_cut`)."""
    check_method(config)
    at = tuple(name.strip() for name in config.model.cut.split(","))
    if config.topology == "ushaped" and len(at) == 1:
        at = (*at, model_zoo.default_tail_cut(config.model.name))
    # vertical: one cut per client's copy; multihop: client | relay | server.
    expected = 2 if config.topology in ("ushaped", "multihop") else 1
    if len(at) != expected:
        what = {
            "ushaped": "the client's cut and the tail's, e.g. 'pool1,fc2'",
            "multihop": "the client's cut and the relay's, e.g. 'pool1,pool2'",
        }.get(config.topology, "one layer, e.g. 'pool1'")
        raise ValueError(
            f"config.topology={config.topology!r} needs {expected} cut layer(s) "
            f"in config.model.cut ({what}), got {config.model.cut!r}: set "
            "--config.model.cut"
        )
    return at if len(at) > 1 else at[0]


def build_segments(config, data=None) -> Segments:
    """The config's model (seeded, as every party builds it) cut at its cut."""
    return cut(build_model(config, data), cut_layers(config))


def load_data(config):
    """The dataset of `config.data`: numpy arrays, or a `StreamingSource`
    for datasets read per epoch (imagenet2012)."""
    from splitkeras import data as data_lib
    from splitkeras.data.streaming import STREAMING, open_source

    if config.data.name in STREAMING:
        return open_source(config)
    return data_lib.load(config.data.name, config.data.path, config.data.download)


def vertical_input_shape(config, data=None) -> tuple:
    """The strip of the image each of the vertical clients holds."""
    height, width, channels = data_spec(config, data).input_shape
    if width % config.num_clients:
        raise ValueError(
            f"image width {width} does not split into config.num_clients="
            f"{config.num_clients} equal strips"
        )
    return (height, width // config.num_clients, channels)


def model_builder(config, data=None):
    """A zero-argument function building `config`'s uncut model, seeded (a
    vertical client's on its strip; multi-task with its second head)."""
    _check_topology(config)
    input_shape = None
    if config.topology == "vertical":
        input_shape = vertical_input_shape(config, data)

    def build():
        model = build_model(config, data, input_shape)
        if config.topology == "multitask":
            num_groups = int(tf.reduce_max(task_groups(config))) + 1
            model = model_zoo.with_task_head(
                model, config.multitask.head_from, num_groups, "task1_logits"
            )
        return model

    return build


def _check_topology(config) -> None:
    check_method(config)
    if config.topology in ("vertical", "multihop", "multitask") and (
        config.method != "split"
    ):
        raise ValueError(
            f"config.topology={config.topology!r} needs config.method='split', "
            f"got {config.method!r}"
        )
    if config.topology in ("multihop", "multitask") and config.num_clients != 1:
        raise ValueError(
            f"config.topology={config.topology!r} runs one client; set "
            f"config.num_clients=1 (got {config.num_clients})"
        )


def build_schedule(config, data=None, server_strategy=None):
    """Every party of `config`'s schedule, in one process (`splitkeras.schedules`)."""
    from splitkeras.schedules import schedule_for

    build = model_builder(config, data)
    at = cut_layers(config) if config.method in SPLIT_METHODS else None
    return schedule_for(
        config,
        build_model=build,
        make_optimizer=lambda: make_optimizer(config),
        loss=make_loss(),
        at=at,
        server_strategy=server_strategy,
    )


def task_groups(config) -> tf.Tensor:
    """The second task's label per class (multi-task), as an int64 tensor."""
    groups = [int(g) for g in config.multitask.groups.split(",") if g.strip()]
    if not groups:
        raise ValueError(
            "config.topology='multitask' needs config.multitask.groups: the "
            "second task's label of each class, e.g. '0,0,1,2'"
        )
    return tf.constant(groups, tf.int64)
