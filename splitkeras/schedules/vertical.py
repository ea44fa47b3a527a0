"""Vertically partitioned split learning (Vepakomma et al. 2018).

K clients hold different features (or modalities) of the same samples. Each
client runs its own segment on its features and sends the cut tensor ``a_k``
with the batch's row numbers; the server (`parties.VerticalServer`) merges
the cut tensors, runs its segment and the loss, and returns each client the
gradient of its own ``a_k``. One designated client (the label owner) sends
the labels, as in vanilla split learning; the others send only cut tensors
and row numbers.

The parties first agree on the samples they all hold, without showing each
other any id outside the intersection (`schedules.alignment`, a private set
intersection); each batch then names rows of that aligned order, never ids.

A client in a process of its own runs `schedules.round_client.RoundClient`
(BEGIN, one `Client.train_step` per batch, END); `VerticalSplit` runs the K
clients and
the server in one process, each step fused into one graph: the K forwards,
the transport (which encodes with the codec and counts bytes per client and
direction), the server and the K backwards.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from splitkeras.objective import Objective
from splitkeras.parties.client import Client
from splitkeras.parties.segment_step import compiled, optimizer_factory, specs_of
from splitkeras.parties.vertical_server import (
    MERGES,
    VerticalServer,
    alignment_checks,
    merge_cut_tensors,
)
from splitkeras.protocol import Kind, Message
from splitkeras.schedules.base import Schedule
from splitkeras.schedules.coordinator import Rounds
from splitkeras.transport.codec import as_pair
from splitkeras.transport.local import LocalTransport

__all__ = [
    "MERGES",
    "VerticalServer",
    "VerticalSplit",
    "align",
    "merge_cut_tensors",
    "split_image_halves",
]


class VerticalSplit(Schedule):
    """K clients holding different features of the same samples, one server.

    Args:
      client_segments: K Keras models, client k's features -> its cut tensor.
      server_segment: a Keras model, merged cut tensor -> predictions.
      make_optimizer: a callable returning a fresh optimizer (called once per
        party), or an optimizer name.
      loss: the Keras loss (name or instance) the server computes.
      metrics: metrics the server tracks ("accuracy": sparse categorical).
      merge: "concat" (last axis), "sum" or "mean" of the cut tensors.
      label_client: the client that owns the labels and sends them.
      codec: the wire codec of the in-process transport: one name (both
        directions) or an (activations, gradients) pair.
      run_eagerly: run steps eagerly instead of as one `tf.function`.
      jit_compile: compile the steps with XLA.
      marvell_strength: the server's Marvell-style noise on the gradients
        it sends to the clients without labels (0: off; `VerticalServer`).
      seed: seed of that noise.

    Batches are `(features, ids, y)`: K feature tensors, K id tensors (one
    per client; they travel as int64 and must list the same samples in the
    same order, see `align`) and the label owner's labels `y`.

    Attributes:
      clients: the K `Client`s; client k holds `client_segments[k]`.
      server: the `VerticalServer`.
      transport: the `LocalTransport` whose codec and byte counters carry
        every message.
    """

    def __init__(
        self,
        client_segments,
        server_segment,
        make_optimizer,
        loss,
        metrics=("accuracy",),
        merge="concat",
        label_client=0,
        codec="float32",
        run_eagerly=False,
        jit_compile=False,
        marvell_strength=0.0,
        seed=0,
    ):
        make = optimizer_factory(make_optimizer)
        self.num_clients = len(client_segments)
        self.label_client = label_client
        self.clients = [
            Client(segment, make(), client_id=k)
            for k, segment in enumerate(client_segments)
        ]
        self.server = VerticalServer(
            server_segment,
            make(),
            Objective(loss, metrics),
            self.num_clients,
            merge,
            label_client,
            client_specs=[specs_of(c.outputs)[0] for c in client_segments],
            marvell_strength=marvell_strength,
            seed=seed,
        )
        for party in [*self.clients, self.server]:
            party.build_optimizer()
        self.coordinator = Rounds(self.server, self.num_clients, evaluators=None)
        # A vertical step sends K messages before the server can answer, so
        # it carries them one by one instead of using `request`.
        self.transport = LocalTransport(None, self.num_clients, *as_pair(codec))
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        steps = (self._train_step, self._evaluate_step, self._predict_step)
        steps = [compiled(f, run_eagerly, jit_compile) for f in steps]
        self._train_fn, self._evaluate_fn, self._predict_fn = steps
        self._check_fn = None
        if jit_compile and not run_eagerly:
            self.server.checks_alignment = False
            self._check_fn = compiled(self._check_alignment)

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [p.optimizer for p in [*self.clients, self.server]]

    def _check_alignment(self, ids):
        """The server's id alignment check, as a graph of its own."""
        requests = self._requests(Kind.TRAIN, self._step, [()] * len(ids), ids)
        alignment_checks(requests)

    def _checked(self, ids):
        if self._check_fn is not None:
            self._check_fn(ids)
        return ids

    def _requests(self, kind, step, cuts, ids, y=None):
        return [
            Message(
                kind=kind,
                client_id=k,
                step=step,
                tensors=tuple(cut),
                labels=y if k == self.label_client else None,
                ids=tf.cast(ids[k], tf.int64),
            )
            for k, cut in enumerate(cuts)
        ]

    def _exchange(self, requests) -> list[Message]:
        arrived = [self.transport.carry_up(m) for m in requests]
        replies = self.server.handle_batch(arrived)
        return [self.transport.carry_down(r) for r in replies]

    def _train_step(self, features, ids, y):
        step = self._step.assign_add(1)
        forwards = [c.forward(x) for c, x in zip(self.clients, features)]
        requests = self._requests(Kind.TRAIN, step, [f.cut for f in forwards], ids, y)
        replies = self._exchange(requests)
        for client, forward, reply in zip(self.clients, forwards, replies):
            client.backward(forward, reply.tensors)
        return replies[self.label_client].loss

    def _inference_cuts(self, features):
        # Each client runs its own segment in inference mode (no tape).
        return [c.infer(x) for c, x in zip(self.clients, features)]

    def _evaluate_step(self, features, ids, y):
        cuts = self._inference_cuts(features)
        replies = self._exchange(
            self._requests(Kind.EVALUATE, self._step, cuts, ids, y)
        )
        return replies[self.label_client].loss

    def _predict_step(self, features, ids):
        cuts = self._inference_cuts(features)
        replies = self._exchange(self._requests(Kind.PREDICT, self._step, cuts, ids))
        outputs = list(replies[self.label_client].tensors)
        return outputs[0] if len(outputs) == 1 else outputs

    def _unpack(self, batch):
        features, ids, y = batch
        features, ids = list(features), list(ids)
        if len(features) != self.num_clients or len(ids) != self.num_clients:
            raise ValueError(
                f"a vertical batch needs {self.num_clients} feature tensors and "
                f"{self.num_clients} id tensors (one per client); got "
                f"{len(features)} and {len(ids)}"
            )
        return features, ids, y

    def train_step(self, batch) -> tf.Tensor:
        """One training step on `(features, ids, y)`; returns the batch loss."""
        features, ids, y = self._unpack(batch)
        return self._train_fn(features, self._checked(ids), y)

    def round(self, epoch, dataset, test=None, skip=0):
        """Round `epoch` on one dataset of `(features, ids, y)` batches: every
        client begins it, the steps, every client ends it; with `test`, the
        evaluation, which the label owner reports."""
        for client in self.clients:
            self._control(Kind.BEGIN, client.client_id, epoch)
        examples = 0
        for batch in dataset:
            yield self.train_step(batch)
            examples += int(tf.nest.flatten(batch[2])[0].shape[0])
        for client in self.clients:
            self._control(Kind.END, client.client_id, epoch, count=examples)
        if test is not None:
            self.evaluate(test)
            self._control(Kind.REPORT, self.label_client, epoch)

    def _control(self, kind, client_id, epoch, **fields):
        message = Message(kind, client_id, round=epoch, **fields)
        self.transport.carry_down(
            self.coordinator.handle(self.transport.carry_up(message))
        )

    def evaluate(self, dataset) -> dict:
        """Mean loss and metrics over `dataset`'s `(features, ids, y)` batches."""
        self.server.objective.reset(training=False)
        for batch in dataset:
            features, ids, y = self._unpack(batch)
            self._evaluate_fn(features, self._checked(ids), y)
        return self.server.objective.result(training=False)

    def predict(self, features, ids, batch_size=None) -> tf.Tensor:
        """The server segment's outputs for K aligned feature and id arrays.

        Returns them to the label owner; with `batch_size`, runs in batches.
        """
        features, ids, _ = self._unpack((features, ids, None))
        n = len(ids[0])
        size = batch_size or max(n, 1)
        outputs = [
            self._predict_fn(
                [x[i : i + size] for x in features],
                self._checked([d[i : i + size] for d in ids]),
            )
            for i in range(0, n, size)
        ]
        return tf.concat(outputs, axis=0)

    def byte_counts(self) -> dict:
        """Bytes carried so far: {"bytes_up": [per client], "bytes_down": [...]}."""
        return self.transport.byte_counts()

    def checkpoints(self, **extra) -> dict:
        """One `tf.train.Checkpoint` per party, each holding only its own state."""
        parties = {
            f"client_{c.client_id}": c.checkpoint(vertical_step=self._step, **extra)
            for c in self.clients
        }
        parties["server"] = self.server.checkpoint(
            vertical_step=self._step,
            **extra,
            coordinator=tf.train.Checkpoint(**self.coordinator.trackables()),
        )
        return parties


def align(ids_per_client, features_per_client):
    """Reorders each client's rows to the sorted sample ids all clients share.

    Args:
      ids_per_client: K arrays of sample ids, each in its client's row order.
      features_per_client: K feature arrays whose first axis matches the
        client's ids.

    Returns:
      `(ids, features)`: the sorted ids and the K feature arrays reordered so
      that row i of every client is sample `ids[i]`.

    Raises:
      ValueError: a client's ids and features differ in length, a client
        holds an id twice, or a sample id is missing from some client (the
        message names up to 5 missing ids per client).
    """
    ids_per_client = [np.asarray(ids).reshape(-1) for ids in ids_per_client]
    if len(ids_per_client) != len(features_per_client):
        raise ValueError(
            f"got ids for {len(ids_per_client)} clients but features for "
            f"{len(features_per_client)}"
        )
    for k, (ids, feats) in enumerate(zip(ids_per_client, features_per_client)):
        _check_client_rows(k, ids, feats)
    every = np.unique(np.concatenate(ids_per_client))
    _check_complete(every, ids_per_client)
    aligned = []
    for ids, feats in zip(ids_per_client, features_per_client):
        order = np.argsort(ids, kind="stable")
        aligned.append(np.asarray(feats)[order])
    return every, aligned


def _check_client_rows(k, ids, features):
    if len(ids) != len(features):
        raise ValueError(
            f"client {k} has {len(ids)} ids but {len(features)} feature rows"
        )
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1][:5].tolist()
        raise ValueError(f"client {k} holds sample ids more than once: {twice}")


def _check_complete(every, ids_per_client):
    problems = []
    for k, ids in enumerate(ids_per_client):
        missing = np.setdiff1d(every, ids)
        if missing.size:
            more = f" (and {missing.size - 5} more)" if missing.size > 5 else ""
            problems.append(f"client {k} lacks ids {missing[:5].tolist()}{more}")
    if problems:
        raise ValueError(
            "every client must hold every sample, but "
            + "; ".join(problems)
            + ". Drop those samples from the other clients (keep the ids all "
            "clients share) before training."
        )


def split_image_halves(x):
    """Splits images `(N, H, W, C)` along the width into (left, right) halves.

    The example of the issue: two clients each hold one half of every image.
    With an odd width the right half is one column wider. Works on NumPy
    arrays and tensors alike.
    """
    if len(x.shape) != 4:
        raise ValueError(
            f"split_image_halves expects images of shape (N, H, W, C); got "
            f"shape {tuple(x.shape)}"
        )
    half = x.shape[2] // 2
    return x[:, :, :half], x[:, :, half:]
