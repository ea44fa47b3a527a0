"""Each client's batches: shards of the training set, per-round orders, views.

The training set is partitioned across clients (`config.data.partition`);
each round every client gets its own shuffled shard (the order drawn from
(seed, round, client)), vertical clients their strip of every image with
its row number, multi-task batches the labels of every task.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras.builders import task_groups
from splitkeras.data.streaming import StreamingSource

__all__ = [
    "client_dataset",
    "client_flops_per_epoch",
    "client_shards",
    "epoch_datasets",
    "steps_per_round",
    "test_data",
]


def client_shards(config, arrays) -> list:
    """The (x, y) training shard of each client, per `config.data.partition`
    (a streaming source: each client's shard index)."""
    if isinstance(arrays, StreamingSource):
        return list(range(config.num_clients))
    if config.topology == "vertical":
        return None  # every client holds every sample (its strip of it)
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


def epoch_datasets(config, arrays, shards, epoch):
    """The batches of round `epoch`: one dataset per client, in client order
    (vertical: one dataset of every client's strips)."""
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
    # One client: the order of the whole set (as centralized training draws it).
    stream = k if config.num_clients > 1 else None
    return data_lib.train_dataset(
        x, y, config.train.batch_size, config.seed, epoch, stream=stream
    )


def _client_datasets(config, arrays, shards, epoch):
    return [
        client_dataset(config, arrays, shard, k, epoch)
        for k, shard in enumerate(shards)
    ]


def steps_per_round(config, arrays, shards) -> int:
    """Training steps of one round over all clients (0 if unknown: streams)."""
    if isinstance(arrays, StreamingSource) or shards is None:
        if config.topology == "vertical":
            return data_lib.steps_per_epoch(
                len(arrays.x_train), config.train.batch_size
            )
        return 0
    steps = sum(
        data_lib.steps_per_epoch(len(x), config.train.batch_size) for x, _ in shards
    )
    if config.method == "fedavg":
        steps *= config.fedavg.local_epochs
    return steps


def client_flops_per_epoch(config, arrays):
    """One client's training FLOPs per epoch, for round-robin / SplitFed /
    FedAvg / large-batch SGD with image data; None for other topologies."""
    from splitkeras.accounting import tables

    if config.topology not in ("vanilla", "ushaped") or config.method == "centralized":
        return None
    if isinstance(arrays, StreamingSource):
        return None  # scripts/resource_table.py has the ImageNet figures
    a = tables.assumptions(config, arrays)
    return tables.client_flops(a, _FLOPS_METHOD[config.method], config.num_clients) / (
        a.epochs
    )


_FLOPS_METHOD = {
    "split": "split",
    "splitfed_v1": "splitfed",
    "splitfed_v2": "splitfed",
    "fedavg": "fedavg",
    "large_batch_sgd": "large_batch_sgd",
}
