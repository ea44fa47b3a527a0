"""Vertically partitioned split learning (Vepakomma et al. 2018).

K clients hold different features (or modalities) of the same samples. Each
client runs its own segment on its features and sends the cut tensor ``a_k``
with the batch's sample ids. The server checks that all clients sent the same
ids in the same order, merges the cut tensors ("concat" along the last axis,
"sum" or "mean"), runs its segment and the loss, updates its own weights and
returns to each client the gradient of the loss with respect to that client's
own ``a_k``. One designated client (the label owner) sends the labels, as in
vanilla split learning; the others send only cut tensors and ids.

```
client k: x_k ──segment_k──► a_k ─┐ (+ ids_k; + y from the label owner)
server:        merge(a_0..a_K-1) ──segment──► logits, loss(y)
server:        dL/da_k ─► client k: tape.gradient(a_k, vars_k, dL/da_k)
```

Every message goes through the in-process transport, which encodes it with the
codec and counts its bytes per client and direction; the whole step compiles
into one `tf.function`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from splitkeras.objective import Objective
from splitkeras.parties.client import Client
from splitkeras.parties.segment_party import SegmentParty
from splitkeras.parties.segment_step import (
    apply_gradients,
    compiled,
    optimizer_factory,
    regularization,
)
from splitkeras.protocol import Kind, Message, flat
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

MERGES = ("concat", "sum", "mean")
_REQUESTS = (Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT)


def merge_cut_tensors(tensors, merge: str) -> tf.Tensor:
    """Merges the clients' cut tensors (in client order) into one tensor."""
    if merge == "concat":
        return tf.concat(list(tensors), axis=-1)
    total = tf.add_n(list(tensors))
    return total if merge == "sum" else total / len(tensors)


class VerticalServer(SegmentParty):
    """The server of a vertical split: merges K clients' cut tensors.

    Args:
      segment: the server segment (merged cut tensor -> logits).
      optimizer: the server's own optimizer.
      objective: the loss and running metrics (`splitkeras.objective`).
      num_clients: K, the number of clients that send a message each step.
      merge: how the cut tensors are merged: "concat", "sum" or "mean".
      label_client: the client whose messages carry the labels.
    """

    def __init__(
        self, segment, optimizer, objective, num_clients, merge="concat", label_client=0
    ):
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; choose one of {MERGES}")
        if not 0 <= label_client < num_clients:
            raise ValueError(
                f"label_client={label_client} is not one of the {num_clients} "
                f"clients (0..{num_clients - 1})"
            )
        self.segment = segment
        self.optimizer = optimizer
        self.objective = objective
        self.num_clients = num_clients
        self.merge = merge
        self.label_client = label_client
        # False when the schedule runs `alignment_checks` itself, outside an
        # XLA-compiled step (XLA cannot compile their formatted messages).
        self.checks_alignment = True

    def handle_batch(self, messages: list[Message]) -> list[Message]:
        """Answers one step's messages, one per client, with one reply each.

        Args:
          messages: one TRAIN, EVALUATE or PREDICT message from each client,
            all for the same step and the same sample ids.

        Returns:
          The replies in client-id order: GRADIENTS (TRAIN; the label owner's
          also carries the loss), ACK (EVALUATE; the label owner's carries the
          loss) or, for PREDICT, SERVER_OUTPUT to the label owner and an empty
          ACK to the others.

        Raises:
          ValueError: the messages are not one per client of one kind, a cut
            tensor is missing, or labels come from the wrong client.
          tf.errors.InvalidArgumentError: (when the step runs) the clients'
            sample ids or steps differ; the message names the first
            mismatching position and the two ids.
        """
        messages = self._validate(messages)
        checks = _alignment_checks(messages) if self.checks_alignment else []
        with tf.control_dependencies(checks):
            cuts = [tf.identity(m.tensors[0]) for m in messages]
        kind = messages[0].kind
        if kind == Kind.TRAIN:
            return self._train(messages, cuts)
        outputs = self.segment(merge_cut_tensors(cuts, self.merge), training=False)
        owner = messages[self.label_client]
        if kind == Kind.EVALUATE:
            loss = self.objective(owner.labels, outputs, owner.sample_weight, False)
            return self._replies(messages, Kind.ACK, [()] * len(messages), loss)
        tensors = [()] * len(messages)
        tensors[self.label_client] = flat(outputs)
        kinds = [Kind.ACK] * len(messages)
        kinds[self.label_client] = Kind.SERVER_OUTPUT
        return self._replies(messages, kinds, tensors, None)

    def _train(self, messages, cuts):
        owner = messages[self.label_client]
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(cuts)
            y_pred = self.segment(merge_cut_tensors(cuts, self.merge), training=True)
            loss = self.objective(owner.labels, y_pred, owner.sample_weight, True)
            reg = regularization(self.segment)
            total = loss if reg is None else loss + reg
        grads = tape.gradient(total, cuts + variables)
        apply_gradients(self.optimizer, grads[len(cuts) :], variables)
        cut_grads = [
            (tf.zeros_like(c) if g is None else g,) for c, g in zip(cuts, grads)
        ]
        return self._replies(messages, Kind.GRADIENTS, cut_grads, loss)

    def _validate(self, messages):
        ids = sorted(m.client_id for m in messages)
        if ids != list(range(self.num_clients)):
            raise ValueError(
                f"expected one message from each of clients 0..{self.num_clients - 1}"
                f", got messages from clients {ids}"
            )
        messages = sorted(messages, key=lambda m: m.client_id)
        kinds = {m.kind for m in messages}
        if len(kinds) != 1 or not kinds <= set(_REQUESTS):
            names = sorted(k.name for k in kinds)
            raise ValueError(
                f"a vertical step needs one kind of request (TRAIN, EVALUATE or "
                f"PREDICT) from every client; got {names}"
            )
        for m in messages:
            self._validate_one(m)
        return messages

    def _validate_one(self, m):
        if len(m.tensors) != 1:
            raise ValueError(
                f"client {m.client_id} sent {len(m.tensors)} cut tensors; a "
                "vertical client segment must have exactly one output"
            )
        if m.ids is None:
            raise ValueError(
                f"client {m.client_id} sent no sample ids; vertical split "
                "learning aligns the clients' rows by id (Message.ids)"
            )
        owner = m.client_id == self.label_client
        if not owner and (m.labels is not None or m.sample_weight is not None):
            raise ValueError(
                f"client {m.client_id} sent labels, but only the label owner "
                f"(client {self.label_client}) may send them"
            )
        if owner and m.kind != Kind.PREDICT and m.labels is None:
            raise ValueError(
                f"{m.kind.name} message from the label owner (client "
                f"{m.client_id}) has no labels; the server needs them for the loss"
            )

    def _replies(self, messages, kinds, tensors, loss):
        kinds = kinds if isinstance(kinds, list) else [kinds] * len(messages)
        return [
            Message(
                kind=kind,
                client_id=m.client_id,
                step=m.step,
                tensors=tuple(t),
                # The loss is label information: only the label owner gets it.
                loss=loss if m.client_id == self.label_client else None,
            )
            for m, kind, t in zip(messages, kinds, tensors)
        ]


def _alignment_checks(messages) -> list:
    """Assert ops: every client's ids and step equal client 0's."""
    first = messages[0]
    checks = []
    for m in messages[1:]:
        checks.append(
            tf.debugging.assert_equal(
                m.step,
                first.step,
                message=f"client {m.client_id} and client {first.client_id} "
                "sent messages for different steps",
            )
        )
        checks.append(_assert_same_ids(first, m))
    return [c for c in checks if c is not None]


def _assert_same_ids(first, other):
    """Fails naming the first position where `other`'s ids differ from `first`'s.

    `tf.debugging.assert_equal` cannot put computed values (the position and
    the two ids) into its message in a graph, so this uses
    `tf.debugging.Assert` with a formatted message; both raise
    `tf.errors.InvalidArgumentError`, eagerly or in a `tf.function`.
    """
    a = tf.reshape(first.ids, [-1])
    b = tf.reshape(tf.cast(other.ids, a.dtype), [-1])
    n_a, n_b = tf.size(a), tf.size(b)
    n = tf.minimum(n_a, n_b)
    # A length mismatch counts as a difference at the shorter batch's end.
    differ = tf.concat([tf.not_equal(a[:n], b[:n]), [tf.not_equal(n_a, n_b)]], 0)
    pos = tf.argmax(tf.cast(differ, tf.int32), output_type=tf.int32)
    none = tf.constant([-1], a.dtype)
    message = tf.strings.format(
        "sample ids of client {} differ from those of client {} at position {}: "
        "client {} has id {}, client {} has id {} (-1: no sample; batch sizes {} "
        "and {}). Align the clients' rows by id first (vertical.align).",
        (
            other.client_id,
            first.client_id,
            pos,
            first.client_id,
            tf.concat([a, none], 0)[pos],
            other.client_id,
            tf.concat([b, none], 0)[pos],
            n_a,
            n_b,
        ),
    )
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(differ)), [message])


class VerticalSplit:
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
        )
        for party in [*self.clients, self.server]:
            party.build_optimizer()
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
        _alignment_checks(requests)

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

    def resumed(self, epochs_done: int) -> None:
        """Nothing to rebuild: every party's checkpoint holds its state."""
        del epochs_done

    def train_step(self, batch) -> tf.Tensor:
        """One training step on `(features, ids, y)`; returns the batch loss."""
        features, ids, y = self._unpack(batch)
        return self._train_fn(features, self._checked(ids), y)

    def train_epoch(self, dataset, progress=None) -> dict:
        """Trains on every batch of `dataset`; returns the epoch's mean metrics.

        Args:
          dataset: an iterable of `(features, ids, y)` batches.
          progress: an optional `splitkeras.progress.Progress`, told the
            global step after each batch.
        """
        objective = self.server.objective
        objective.reset(training=True)
        for batch in dataset:
            self.train_step(batch)
            if progress is not None:
                step = int(self._step.numpy())
                if progress.due(step):
                    progress.report(step, objective.result(training=True))
        return objective.result(training=True)

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
        parties = {f"client_{c.client_id}": c for c in self.clients}
        parties["server"] = self.server
        return {
            name: party.checkpoint(step=self._step, **extra)
            for name, party in parties.items()
        }


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
