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
from splitkeras.checkpointing import PartyCheckpoints

log = logging.getLogger("splitkeras")

__all__ = ["client_shards", "run_schedule"]


def client_shards(config, arrays) -> list:
    """The (x, y) training shard of each client, per `config.data.partition`."""
    indices = data_lib.partition(
        arrays.y_train,
        config.num_clients,
        method=config.data.partition,
        alpha=config.data.dirichlet_alpha,
        seed=config.seed,
    )
    return [(arrays.x_train[i], arrays.y_train[i]) for i in indices]


def _epoch_datasets(config, shards, epoch) -> list:
    return [
        data_lib.train_dataset(
            x, y, config.train.batch_size, config.seed, epoch, stream=k
        )
        for k, (x, y) in enumerate(shards)
    ]


def _write(writer, values: dict, step: int) -> None:
    with writer.as_default(step=step):
        for key, value in values.items():
            tf.summary.scalar(key, value)


def _totals(counts: dict) -> dict:
    return {key: sum(values) for key, values in counts.items()}


def run_schedule(config, workdir, schedule, arrays, evaluate) -> dict:
    """Trains `schedule` for `config.train.epochs`; returns byte counts.

    Args:
      config: the experiment config.
      workdir: the run's directory.
      schedule: has `train_epoch(client_datasets) -> logs`, `evaluate`,
        `byte_counts()` and `checkpoints(**extra) -> {party: Checkpoint}`.
      arrays: the dataset.
      evaluate: `evaluate(schedule) -> logs` on the test split.

    Returns:
      {"epochs_done", "wall_seconds"} after training.
    """
    shards = client_shards(config, arrays)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    wall_var = tf.Variable(0.0, dtype=tf.float64, trainable=False)
    checkpoints = PartyCheckpoints(
        os.path.join(workdir, "checkpoints"),
        schedule.checkpoints(epoch=epoch_var, wall_seconds=wall_var),
    )
    if checkpoints.restore_latest() is not None:
        schedule.resumed(int(epoch_var.numpy()))
        log.info("Resumed after epoch %d in %s", int(epoch_var.numpy()), workdir)
    writers = {
        name: tf.summary.create_file_writer(os.path.join(workdir, name))
        for name in ("train", "validation")
    }
    start = time.perf_counter() - float(wall_var.numpy())
    for epoch in range(int(epoch_var.numpy()), config.train.epochs):
        began = time.perf_counter()
        logs = schedule.train_epoch(_epoch_datasets(config, shards, epoch))
        seconds = time.perf_counter() - began
        val = evaluate(schedule)
        totals = _totals(schedule.byte_counts())
        _write(
            writers["train"], {**logs, "epoch_seconds": seconds, **totals}, epoch + 1
        )
        _write(writers["validation"], {**val, **totals}, epoch + 1)
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
    return {"wall_seconds": float(wall_var.numpy())}


def _rounded(logs: dict) -> dict:
    return {k: round(float(v), 4) for k, v in logs.items()}
