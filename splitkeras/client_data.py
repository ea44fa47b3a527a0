"""Each client's batches: its site's rows, in the order of each round.

A client's data is its site (`splitkeras.data.sites`): read from its own
file (`config.data.sites`, written by `splitkeras partition`), or cut out of
the whole dataset exactly as the file would be. Each round it trains on its
rows in an order drawn from (seed, round, client) (one client: from (seed,
round), as centralized training draws it); multi-task batches carry every
task's labels; vertical clients train on their rows of the aligned order,
each batch naming its rows. Streams (imagenet2012) keep their own per-client
shards of the files.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras.builders import load_data, task_groups
from splitkeras.data.sites import Site, load_site, partition_sites
from splitkeras.data.streaming import StreamingSource
from splitkeras.privacy.label_dp import training_labels

__all__ = [
    "aligned_site",
    "shared_data",
    "client_flops_per_epoch",
    "site_of",
    "sites",
    "steps_per_round",
    "test_batches",
    "train_batches",
    "vertical_ids",
]


def shared_data(config):
    """The whole dataset (`builders.load_data`), or None when each client
    reads its own site file (`config.data.sites`)."""
    if config.data.get("sites", ""):
        return None
    return load_data(config)


def sites(config, data=None) -> list:
    """Every client's site (in one process): from `config.data.sites`, or
    partitioned out of `data` as `splitkeras partition` would (a stream:
    each client's shard index)."""
    if isinstance(data, StreamingSource):
        return list(range(config.num_clients))
    folder = config.data.get("sites", "") or ""
    if folder:
        return [load_site(folder, f"client_{k}") for k in range(config.num_clients)]
    vertical = config.topology == "vertical"
    return partition_sites(
        data,
        config.num_clients,
        method="vertical" if vertical else config.data.partition,
        alpha=config.data.dirichlet_alpha,
        seed=config.seed,
    )


def site_of(config, k: int, data=None):
    """Client k's own site: its file alone if `config.data.sites` is set
    (nothing else is read), else its part of `data`."""
    folder = config.data.get("sites", "") or ""
    if folder:
        return load_site(folder, f"client_{k}")
    return sites(config, data if data is not None else shared_data(config))[k]


def train_batches(config, site, k: int, epoch: int, data=None):
    """Client k's training batches of round `epoch` (its labels under label
    DP, `config.privacy.label_epsilon`, drawn once per client)."""
    if isinstance(data, StreamingSource):
        if config.privacy.get("label_epsilon", 0.0):
            raise ValueError(
                f"config.privacy.label_epsilon randomizes a label holder's "
                f"labels once, before training; {data.name} streams its labels: "
                "set label_epsilon=0"
            )
        return data.train(
            config.train.batch_size, config.seed, epoch, site, config.num_clients
        )
    if config.topology == "vertical":
        return _vertical_batches(config, site, epoch)
    # One client: the order of the whole set (as centralized training draws it).
    stream = k if config.num_clients > 1 else None
    ds = data_lib.train_dataset(
        site.x_train,
        training_labels(config, site.y_train, site.num_classes, k),
        config.train.batch_size,
        config.seed,
        epoch,
        stream=stream,
    )
    return _tasks(config, ds)


def test_batches(config, site, data=None):
    """The test rows a client evaluates on, batched."""
    if isinstance(data, StreamingSource):
        return data.eval(config.train.eval_batch_size)
    if config.topology == "vertical":
        y = _labels(site.y_test, len(site.x_test))
        return data_lib.eval_dataset(
            site.x_test, y, config.train.eval_batch_size, with_ids=True
        )
    ds = data_lib.eval_dataset(site.x_test, site.y_test, config.train.eval_batch_size)
    return _tasks(config, ds)


def _tasks(config, ds):
    """Multi-task: (x, y) batches as (x, (y, second task's label))."""
    if config.topology != "multitask":
        return ds
    groups = task_groups(config)
    return ds.map(lambda x, y: (x, (y, tf.gather(groups, y))))


def _labels(y, n):
    """A party without labels batches zeros in their place (never sent)."""
    return y if y is not None else np.zeros(n, np.int64)


def _vertical_batches(config, site, epoch):
    # One party holds the labels: its own labels under label DP.
    y = training_labels(config, site.y_train, site.num_classes)
    y = _labels(y, len(site.x_train))
    return data_lib.train_dataset(
        site.x_train, y, config.train.batch_size, config.seed, epoch, with_ids=True
    )


def vertical_ids(site) -> list:
    """The ids a vertical party aligns: its train then its test samples,
    tagged apart so that a train id never meets a test id."""
    return [f"train:{i}" for i in site.ids_train] + [f"test:{i}" for i in site.ids_test]


def aligned_site(site, rows) -> Site:
    """`site`'s rows of the intersection, in the common order (`rows` from
    the alignment, indexing its `vertical_ids`); its ids become row numbers."""
    rows = np.asarray(rows, np.int64)
    n_train = len(site.ids_train)
    train, test = rows[rows < n_train], rows[rows >= n_train] - n_train

    def take(values, index):
        return None if values is None else values[index]

    return dataclasses.replace(
        site,
        x_train=site.x_train[train],
        y_train=take(site.y_train, train),
        x_test=site.x_test[test],
        y_test=take(site.y_test, test),
        ids_train=np.arange(len(train), dtype=np.int64),
        ids_test=np.arange(len(test), dtype=np.int64),
    )


def vertical_round(config, aligned, epoch, label_owner=0):
    """In one process: every party's batches of a round together, as
    ((x_0, ..., x_K-1), (rows, ..., rows), y of the label owner)."""
    datasets = [_vertical_batches(config, s, epoch) for s in aligned]
    return _zip_parties(datasets, label_owner)


def vertical_test(config, aligned, label_owner=0):
    """In one process: every party's test batches together (as `vertical_round`)."""
    return _zip_parties([test_batches(config, s) for s in aligned], label_owner)


def _zip_parties(datasets, label_owner):
    def merge(*batches):
        xs = tuple(b[0] for b in batches)
        ids = tuple(b[2] for b in batches)
        return xs, ids, batches[label_owner][1]

    return tf.data.Dataset.zip(tuple(datasets)).map(merge)


def steps_per_round(config, all_sites, data=None) -> int:
    """Training steps of one round over all clients (0 if unknown: streams)."""
    if isinstance(data, StreamingSource):
        return 0
    size = config.train.batch_size
    if config.topology == "vertical":
        return data_lib.steps_per_epoch(len(all_sites[0].x_train), size)
    steps = sum(data_lib.steps_per_epoch(len(s.x_train), size) for s in all_sites)
    if config.method == "fedavg":
        steps *= config.fedavg.local_epochs
    return steps


def client_flops_per_epoch(config, all_sites, data=None):
    """One client's training FLOPs per epoch, for round-robin / SplitFed /
    FedAvg / large-batch SGD with image data; None for other topologies."""
    from splitkeras.accounting import tables

    if config.topology not in ("vanilla", "ushaped") or config.method == "centralized":
        return None
    if isinstance(data, StreamingSource):
        return None  # `splitkeras resource-table` has the ImageNet figures
    first = all_sites[0]
    dataset = types.SimpleNamespace(
        input_shape=first.input_shape,
        num_classes=first.num_classes,
        x_train=range(sum(len(s.x_train) for s in all_sites)),
    )
    a = tables.assumptions(config, dataset)
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
