"""Running a multi-client schedule for an experiment: shards, epochs, state.

`experiment.train_and_evaluate` hands every run with more than one client
(or a federated baseline) to `run_schedule`: the training set is partitioned
across clients (`config.data.partition`), each epoch every client gets its
own shuffled shard, and each party checkpoints its own state at the end of
each epoch (the resume granularity of multi-client runs).
"""

from __future__ import annotations

import logging
import os
import time

import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras import learning_rate
from splitkeras.checkpointing import PartyCheckpoints
from splitkeras.data.streaming import StreamingSource
from splitkeras.progress import write_scalars

log = logging.getLogger("splitkeras")

__all__ = ["client_dataset", "client_shards", "run_schedule"]


def client_shards(config, arrays) -> list:
    """The (x, y) training shard of each client, per `config.data.partition`
    (a streaming source: each client's shard index)."""
    if isinstance(arrays, StreamingSource):
        return list(range(config.num_clients))
    indices = data_lib.partition(
        arrays.y_train,
        config.num_clients,
        method=config.data.partition,
        alpha=config.data.dirichlet_alpha,
        seed=config.seed,
    )
    return [(arrays.x_train[i], arrays.y_train[i]) for i in indices]


def vertical_view(dataset, num_clients):
    """(x, y, ids) batches as each client's strip of x, its ids, and y.

    Client k holds the k-th of `num_clients` strips of each image along its
    width (two clients: the left and the right half).
    """

    def split(x, y, ids):
        strips = tf.split(x, num_clients, axis=2)
        return tuple(strips), tuple([ids] * num_clients), y

    return dataset.map(split)


def task_groups(config):
    """The second task's label per class (multi-task), as an int64 tensor."""
    groups = [int(g) for g in config.multitask.groups.split(",") if g.strip()]
    if not groups:
        raise ValueError(
            "config.topology='multitask' needs config.multitask.groups: the "
            "second task's label of each class, e.g. '0,0,1,2'"
        )
    return tf.constant(groups, tf.int64)


def multitask_view(dataset, groups):
    """(x, y) batches as (x, (y, second task's label))."""
    return dataset.map(lambda x, y: (x, (y, tf.gather(groups, y))))


def test_data(config, arrays):
    """The test split batched as the schedule of `config` expects it."""
    if isinstance(arrays, StreamingSource):
        return arrays.eval(config.train.eval_batch_size)
    vertical = config.topology == "vertical"
    ds = data_lib.eval_dataset(
        arrays.x_test, arrays.y_test, config.train.eval_batch_size, with_ids=vertical
    )
    if config.topology == "multitask":
        return multitask_view(ds, task_groups(config))
    return vertical_view(ds, config.num_clients) if vertical else ds


def _epoch_datasets(config, arrays, shards, epoch):
    if isinstance(arrays, StreamingSource) and config.topology not in (
        "vanilla",
        "ushaped",
    ):
        raise ValueError(
            f"{arrays.name} streams to round-robin style runs (vanilla, "
            f"U-shaped); got config.topology={config.topology!r}"
        )
    if config.topology == "vertical":
        ds = data_lib.train_dataset(
            arrays.x_train,
            arrays.y_train,
            config.train.batch_size,
            config.seed,
            epoch,
            with_ids=True,
        )
        return vertical_view(ds, config.num_clients)
    if config.topology == "multitask":
        groups = task_groups(config)
        return [
            multitask_view(ds, groups)
            for ds in _client_datasets(config, arrays, shards, epoch)
        ]
    return _client_datasets(config, arrays, shards, epoch)


def client_dataset(config, arrays, shard, k, epoch):
    """Client `k`'s training batches of `epoch`: its (x, y) shard in the
    order of (seed, epoch, k), or its part of a stream's files."""
    if isinstance(arrays, StreamingSource):
        return arrays.train(
            config.train.batch_size, config.seed, epoch, shard, config.num_clients
        )
    x, y = shard
    return data_lib.train_dataset(
        x, y, config.train.batch_size, config.seed, epoch, stream=k
    )


def _client_datasets(config, arrays, shards, epoch):
    return [
        client_dataset(config, arrays, shard, k, epoch)
        for k, shard in enumerate(shards)
    ]


def _totals(counts: dict) -> dict:
    return {key: sum(values) for key, values in counts.items()}


def run_schedule(
    config, workdir, schedule, arrays, evaluate, client_flops_per_epoch=None
) -> dict:
    """Trains `schedule` for `config.train.epochs`; returns byte counts.

    Args:
      config: the experiment config.
      workdir: the run's directory.
      schedule: has `train_epoch(client_datasets) -> logs`, `evaluate`,
        `byte_counts()` and `checkpoints(**extra) -> {party: Checkpoint}`.
      arrays: the dataset.
      evaluate: `evaluate(schedule) -> logs` on the test split.
      client_flops_per_epoch: one client's training FLOPs per epoch, logged
        cumulatively as `client_tflops`, or None.

    Returns:
      {"steps": training batches over all clients, "wall_seconds",
      "validation": the last epoch's evaluation if this call ran it, else
      None}.
    """
    vertical = config.topology == "vertical"
    shards = None if vertical else client_shards(config, arrays)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    wall_var = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    steps_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoints = PartyCheckpoints(
        os.path.join(workdir, "checkpoints"),
        schedule.checkpoints(epoch=epoch_var, wall_seconds=wall_var, steps=steps_var),
    )
    if checkpoints.restore_latest() is not None:
        schedule.resumed(int(epoch_var.numpy()))
        log.info("Resumed after epoch %d in %s", int(epoch_var.numpy()), workdir)
    writers = {
        name: tf.summary.create_file_writer(os.path.join(workdir, name))
        for name in ("train", "validation")
    }
    start = time.perf_counter() - float(wall_var.numpy())
    val = None
    for epoch in range(int(epoch_var.numpy()), config.train.epochs):
        began = time.perf_counter()
        rate = learning_rate.start_epoch(config.train, schedule.optimizers, epoch)
        datasets = _epoch_datasets(config, arrays, shards, epoch)
        logs = schedule.train_epoch(datasets)
        batches = _batches(config, datasets)
        if batches < 0:  # streams: the schedule counted its steps
            batches = int(getattr(schedule, "steps_in_epoch", 0))
        steps_var.assign_add(batches)
        seconds = time.perf_counter() - began
        val = evaluate(schedule)
        totals = _totals(schedule.byte_counts())
        scalars = {**logs, "epoch_seconds": seconds, **totals}
        if rate is not None:
            scalars["learning_rate"] = rate
        if client_flops_per_epoch is not None:
            # What one client has computed so far (seed: accuracy vs client FLOPs).
            scalars["client_tflops"] = (epoch + 1) * client_flops_per_epoch / 1e12
        write_scalars(writers["train"], scalars, epoch + 1)
        write_scalars(writers["validation"], {**val, **totals}, epoch + 1)
        log.info(
            "epoch %d/%d (%.1f s): train %s validation %s",
            epoch + 1,
            config.train.epochs,
            seconds,
            _rounded(logs),
            _rounded(val),
        )
        epoch_var.assign(epoch + 1)
        wall_var.assign(time.perf_counter() - start)
        checkpoints.save(epoch + 1)
    return {
        "steps": int(steps_var.numpy()),
        "wall_seconds": float(wall_var.numpy()),
        "validation": val,
    }


def _batches(config, datasets) -> int:
    """Training batches in one epoch, over all clients (client steps)."""
    datasets = datasets if isinstance(datasets, list) else [datasets]
    counts = [int(ds.cardinality()) for ds in datasets]
    if any(c < 0 for c in counts):  # a stream of unknown length
        return -1
    total = sum(counts)
    if config.method == "fedavg":
        total *= config.fedavg.local_epochs
    return total


def _rounded(logs: dict) -> dict:
    return {k: round(float(v), 4) for k, v in logs.items()}
