"""The server party on several devices or machines (`tf.distribute`).

`config.server.strategy`:

- "none": one device (the default).
- "mirrored": `tf.distribute.MirroredStrategy` over the server machine's GPUs
  (`config.server.devices` to choose; on a machine without GPUs,
  `config.server.logical_cpus` = N splits the CPU into N logical devices,
  which is how the tests run it).
- "multi_worker": `tf.distribute.MultiWorkerMirroredStrategy`, configured
  by the `TF_CONFIG` environment variable of each server process (see the
  README, "Scaling out").

The server's segment and optimizer are built inside the strategy's scope
(`replicate`); each batch of cut tensors a client sends is split into one
contiguous slice per replica, the loss is averaged over the global batch
(`tf.nn.compute_average_loss`, so summing the replicas' gradients gives the
one-device gradients), and the cut tensors' gradients come back in order.
Batch normalization in the server segment is made synchronized, so its
statistics are those of the whole batch, as on one device.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = [
    "STRATEGIES",
    "check_supported",
    "gather",
    "make_strategy",
    "replicate",
    "split_batch",
]

STRATEGIES = ("none", "mirrored", "multi_worker")


def make_strategy(settings) -> tf.distribute.Strategy | None:
    """The strategy of `config.server` (None for "none").

    Call it before TensorFlow has placed any op: logical CPU devices can only
    be configured then.
    """
    name = settings.get("strategy", "none")
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown config.server.strategy {name!r}; choose one of "
            f"{', '.join(STRATEGIES)}"
        )
    if name == "none":
        return None
    logical = int(settings.get("logical_cpus", 0) or 0)
    if logical > 1:
        _split_cpu(logical)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = settings.get("devices", "") or []
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not devices:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
    cpu_only = all("CPU" in d.upper() for d in devices)
    return tf.distribute.MirroredStrategy(
        devices,
        # NCCL needs GPUs; on CPUs the replicas' values are reduced on one.
        cross_device_ops=tf.distribute.ReductionToOneDevice() if cpu_only else None,
    )


def check_supported(config, strategy) -> None:
    """Refuses what a distributed server does not run (with reasons)."""
    if strategy is None:
        return
    if config.method != "split" or config.topology != "vanilla":
        raise ValueError(
            "config.server.strategy runs the split round robin with a vanilla "
            f"topology; got method={config.method!r}, topology={config.topology!r}"
        )
    if config.train.get("jit_compile", False):
        raise ValueError(
            "config.train.jit_compile with config.server.strategy: XLA cannot "
            "compile a step that runs the strategy's replicas (their variables "
            "live on other devices); turn one of them off"
        )


def _split_cpu(count: int) -> None:
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"config.server.logical_cpus={count}: TensorFlow has already "
            "initialized its devices in this process; create the strategy first"
        ) from e


def _synchronized(layer):
    """A fresh copy of `layer`; batch normalization becomes synchronized,
    also inside nested models."""
    if isinstance(layer, keras.Model):
        return keras.models.clone_model(layer, clone_function=_synchronized)
    config = layer.get_config()
    if isinstance(layer, keras.layers.BatchNormalization):
        config["synchronized"] = True
    return layer.__class__.from_config(config)


def replicate(segment, strategy):
    """A copy of `segment` whose variables live in `strategy`'s scope.

    Same architecture and weights; batch normalization synchronized across
    replicas. The caller builds the optimizer in the same scope.
    """
    with strategy.scope():
        copy = keras.models.clone_model(segment, clone_function=_synchronized)
        copy.set_weights(segment.get_weights())
    return copy


def split_batch(strategy, tensors):
    """Per-replica values: replica i gets the i-th contiguous slice of every
    tensor in `tensors` (a list, all with the same batch size). With B
    examples and n replicas the first B mod n replicas get one more."""
    n = strategy.num_replicas_in_sync
    batch = tf.shape(tensors[0])[0]
    base, extra = batch // n, batch % n
    sizes = tf.stack([base + tf.cast(i < extra, batch.dtype) for i in range(n)])
    pieces = [tf.split(t, sizes, num=n, axis=0) for t in tensors]

    def value(context):
        i = context.replica_id_in_sync_group
        return [p[i] for p in pieces]

    return strategy.experimental_distribute_values_from_function(value)


def gather(strategy, per_replica):
    """Every replica's value, on every worker, concatenated in replica order
    (axis 0): the inverse of `split_batch`."""
    return strategy.gather(per_replica, axis=0)
