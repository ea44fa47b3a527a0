"""The server party on several devices or machines (`tf.distribute`).

`config.server.strategy`:

- "none": one device (the default).
- "mirrored": `tf.distribute.MirroredStrategy` over the server machine's GPUs
  (`config.server.devices` to choose; on a machine without GPUs,
  `config.server.logical_cpus` = N splits the CPU into N logical devices,
  which is how the tests run it).
- "multi_worker": `tf.distribute.MultiWorkerMirroredStrategy`, configured
  by the `TF_CONFIG` environment variable of each server process (see the
  README, "Scaling out"). Over gRPC worker 0 serves the clients and the
  others follow it (`splitkeras.transport.mirror`).

The server's segment and optimizer are built inside the strategy's scope
(`replicate`); each batch of cut tensors a client sends is split into one
contiguous slice per replica, the loss is averaged over the global batch
(`tf.nn.compute_average_loss`, so summing the replicas' gradients gives the
one-device gradients), and the cut tensors' gradients come back in order.
Batch normalization in the server segment is made synchronized, so its
statistics are those of the whole batch, as on one device, and random layers
(dropout) draw different masks on different replicas.

A batch with fewer examples than replicas is padded with copies of its rows
that weigh nothing in the loss, so every replica has at least one example.
The loss, the cut tensors' gradients and the update are then still exact for
layers that treat examples independently; batch normalization's statistics
of such a step include the copies.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

__all__ = [
    "STRATEGIES",
    "check_supported",
    "gather",
    "make_strategy",
    "replicate",
    "split_batch",
    "worker_index",
    "worker_workdir",
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
            "config.train.jit_compile with config.server.strategy: the "
            "distributed server's replica step holds synchronization points "
            "(gradient aggregation, synchronized batch norm), which tf.distribute "
            "cannot run inside an XLA-compiled function; turn one of them off"
        )


def worker_index(strategy) -> int | None:
    """This process's index among a multi-worker strategy's workers (0: the
    chief), or None for a one-process strategy (or none)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None:
        return None
    if task_type != "worker" or "chief" in resolver.cluster_spec().as_dict():
        raise ValueError(
            "a multi_worker server behind gRPC names its processes "
            '{"cluster": {"worker": [...]}} in TF_CONFIG (worker 0 is the '
            f"chief), got task type {task_type!r} in cluster "
            f"{sorted(resolver.cluster_spec().as_dict())}"
        )
    return int(resolver.task_id)


def worker_workdir(strategy, workdir: str) -> str:
    """Where this process writes its run: `workdir` for the chief (worker 0
    when the cluster has no "chief" task) or a one-process strategy, else
    `workdir/worker_<index>`, so that workers sharing a file system do not
    overwrite each other's checkpoints and summaries (each resumes from its
    own)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None or task_type == "chief":
        return workdir
    index = int(resolver.task_id)
    if task_type == "worker" and index == 0:
        if "chief" not in resolver.cluster_spec().as_dict():
            return workdir
    return os.path.join(workdir, f"{task_type}_{index}")


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


class _ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A seed generator whose draws differ between replicas.

    Keras mirrors a layer's seed state, so under a strategy every replica
    would draw the same seed and, for slices of one shape, the same dropout
    mask: the replica id is folded into each draw.
    """

    def next(self, ordered=True):
        seed = super().next(ordered=ordered)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return seed
        folded = tf.random.experimental.stateless_fold_in(
            seed, context.replica_id_in_sync_group
        )
        return tf.cast(folded, seed.dtype)


def _synchronized(layer):
    """A fresh copy of `layer`: batch normalization synchronized and random
    draws (dropout, noise) per replica, also inside nested models."""
    if isinstance(layer, keras.Model):
        return keras.models.clone_model(layer, clone_function=_synchronized)
    config = layer.get_config()
    if isinstance(layer, keras.layers.BatchNormalization):
        config["synchronized"] = True
    copy = layer.__class__.from_config(config)
    for value in vars(copy).values():
        if type(value) is keras.random.SeedGenerator:
            # Same state, one method more: the layer keeps tracking it.
            value.__class__ = _ReplicaSeedGenerator
    return copy


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
    tensor in `tensors` (a list, all with the same batch size), and last a
    float32 vector saying which of its rows are the batch's own (1) and which
    are padding (0).

    With B >= n examples and n replicas the first B mod n replicas get one
    more example. With 0 < B < n the batch is first padded to n rows by
    repeating its rows, so no replica gets an empty slice (TensorFlow's CPU
    convolutions mishandle empty batches); give padding rows zero weight.
    """
    n = strategy.num_replicas_in_sync
    batch = tf.shape(tensors[0])[0]
    size = tf.maximum(batch, n)
    real = tf.cast(tf.range(size) < batch, tf.float32)

    def padded():
        rows = tf.range(size) % tf.maximum(batch, 1)
        return [tf.gather(t, rows) for t in tensors]

    if n > 1:
        tensors = tf.cond(batch < n, padded, lambda: [tf.identity(t) for t in tensors])
    base, extra = size // n, size % n
    sizes = tf.stack([base + tf.cast(i < extra, size.dtype) for i in range(n)])
    pieces = [tf.split(t, sizes, num=n, axis=0) for t in [*tensors, real]]

    def value(context):
        i = context.replica_id_in_sync_group
        return [p[i] for p in pieces]

    return strategy.experimental_distribute_values_from_function(value)


def gather(strategy, per_replica, batch=None):
    """Every replica's value, on every worker, concatenated in replica order
    (axis 0): the inverse of `split_batch`. `batch` (the batch size before
    `split_batch` padded it) drops the padding rows."""
    gathered = strategy.gather(per_replica, axis=0)
    return gathered if batch is None else gathered[:batch]
