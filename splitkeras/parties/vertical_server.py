"""The server of vertically partitioned split learning.

K clients hold different features of the same samples. Each sends the cut
tensor of its features for a batch with the batch's row numbers (the aligned
order all parties agreed on); the label owner also sends the labels. The
server checks that every client sent the same rows in the same order, merges
the cut tensors ("concat" along the last axis, "sum" or "mean"), runs its
segment and the loss, updates its own weights and returns to each client the
gradient of the loss with respect to that client's own cut tensor:

```
client k: x_k ──segment_k──► a_k ─┐ (+ row numbers; + y from the label owner)
server:        merge(a_0..a_K-1) ──segment──► logits, loss(y)
server:        dL/da_k ─► client k: tape.gradient(a_k, vars_k, dL/da_k)
```

With `marvell_strength` > 0 the gradients sent to the clients that do not
hold the labels get Marvell-style noise (`splitkeras.privacy.marvell`,
from the labels of the step), which hides what their gradients tell about
the labels; the label owner's are sent as computed.

In one process the schedule hands it a step's K messages together
(`handle_batch`); a gRPC host hands it one message at a time (`handle`),
and it gathers each step's messages until all K are there.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from splitkeras.parties.segment_party import SegmentParty
from splitkeras.parties.segment_step import (
    apply_gradients,
    compiled,
    regularization,
    specs_of,
)
from splitkeras.privacy.marvell import marvell_noise, num_classes_of
from splitkeras.protocol import Kind, Message, NotYet, flat

__all__ = [
    "MERGES",
    "VerticalServer",
    "alignment_checks",
    "label_protection",
    "merge_cut_tensors",
]

MERGES = ("concat", "sum", "mean")
_REQUESTS = (Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT)


def merge_cut_tensors(tensors, merge: str) -> tf.Tensor:
    """Merges the clients' cut tensors (in client order) into one tensor."""
    if merge == "concat":
        return tf.concat(list(tensors), axis=-1)
    total = tf.add_n(list(tensors))
    return total if merge == "sum" else total / len(tensors)


def label_protection(config) -> dict:
    """The `VerticalServer` arguments of `config.privacy.marvell_strength`:
    the strength and the seed of its noise (apart from every client's)."""
    return {
        "marvell_strength": float(config.privacy.marvell_strength),
        "seed": int(config.seed) * 10007 + int(config.num_clients),
    }


class VerticalServer(SegmentParty):
    """The server of a vertical split: merges K clients' cut tensors.

    Args:
      segment: the server segment (merged cut tensor -> logits).
      optimizer: the server's own optimizer.
      objective: the loss and running metrics (`splitkeras.objective`).
      num_clients: K, the number of clients that send a message each step.
      merge: how the cut tensors are merged: "concat", "sum" or "mean".
      label_client: the client whose messages carry the labels.
      client_specs: [(dtype, shape)] of each client's cut tensor (a host's
        checks).
      marvell_strength: Marvell-style noise on the gradients sent to the
        clients other than `label_client`, its power budget as a multiple
        of the squared distance between a class's mean gradient and the
        rest's (0: off).
      seed: seed of that noise.
    """

    def __init__(
        self,
        segment,
        optimizer,
        objective,
        num_clients,
        merge="concat",
        label_client=0,
        client_specs=None,
        marvell_strength=0.0,
        seed=0,
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
        # [(dtype, shape)] of each client's cut tensor, for a host's checks.
        self.client_specs = client_specs
        if marvell_strength < 0:
            raise ValueError(f"marvell_strength must be >= 0, got {marvell_strength}")
        self.marvell_strength = float(marvell_strength)
        self._seeds = keras.random.SeedGenerator(seed)
        # On a host: given each EVALUATE step's messages (`record`), its
        # `figures()` join the round's validation figures (the label-leak
        # AUCs, `splitkeras.privacy.leakage.EvaluationLeak`).
        self.evaluation_leak = None
        self._gathered = {}  # (kind, step) -> {client: message}
        self._answers = {}  # (kind, step) -> {client: reply}
        self._batch_fns = {}

    # ------------------------------------------ what a host checks against
    def takes_labels(self, client_id: int) -> bool:
        return client_id == self.label_client

    def counts_as_step(self, message: Message) -> bool:
        """A batch is one step, though every party sends its part: its
        coordinator counts the label owner's."""
        return message.client_id == self.label_client

    @property
    def num_classes(self) -> int:
        return int(self.segment.outputs[0].shape[-1] or 0)

    def arrival_specs(self, kind, client_id: int) -> list:
        return [self.client_specs[client_id]]

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The party's own state (+ `extra`), with the state of its
        Marvell-style noise when that is on, so that a resumed or rolled
        back run draws the noise an uninterrupted one would."""
        if self.marvell_strength:
            extra["marvell_seeds"] = self._seeds.state
        return super().checkpoint(**extra)

    def merged(self, cuts) -> tf.Tensor:
        """The clients' cut tensors (in client order) merged as this server
        merges them."""
        return merge_cut_tensors(cuts, self.merge)

    def output_specs(self) -> list:
        return specs_of(self.segment.outputs)

    def rolled_back(self) -> None:
        self._gathered.clear()
        self._answers.clear()
        if self.evaluation_leak is not None:
            self.evaluation_leak.forget()

    def evaluation_figures(self) -> dict:
        """More validation figures of the round's evaluation ({} if none)."""
        if self.evaluation_leak is None:
            return {}
        return self.evaluation_leak.figures()

    # ------------------------------------------ one message at a time (a host)
    def handle(self, message: Message) -> Message:
        """One client's message of a step; answered once every client's is in.

        Raises:
          NotYet: other clients' messages of this step have not arrived; a
            host asks again (the message is kept).
        """
        key = (message.kind, int(message.step))
        answers = self._answers.get(key, {})
        if message.client_id in answers:
            reply = answers.pop(message.client_id)
            if not answers:
                del self._answers[key]
            return reply
        gathered = self._gathered.setdefault(key, {})
        gathered[message.client_id] = message
        if len(gathered) < self.num_clients:
            missing = sorted(set(range(self.num_clients)) - set(gathered))
            raise NotYet(f"step {key[1]} waits for clients {missing}")
        del self._gathered[key]
        messages = [gathered[k] for k in range(self.num_clients)]
        replies = self._batch(message.kind, messages)  # checks the rows first
        if message.kind == Kind.EVALUATE and self.evaluation_leak is not None:
            self.evaluation_leak.record(messages)
        answers = {r.client_id: r for r in replies}
        reply = answers.pop(message.client_id)
        if answers:
            self._answers[key] = answers
        return reply

    def _batch(self, kind, messages) -> list[Message]:
        """`handle_batch`, compiled once per kind (tensors in, tensors out)."""
        fn = self._batch_fns.get(kind)
        if fn is None:
            fn = self._batch_fns[kind] = compiled(
                lambda cuts, ids, y, w: self._flat_batch(kind, cuts, ids, y, w)
            )
        owner = messages[self.label_client]
        cuts = [m.tensors[0] for m in messages]
        ids = [m.ids for m in messages]
        tensors, loss = fn(cuts, ids, owner.labels, owner.sample_weight)
        replies = []
        for m, t in zip(messages, tensors):
            reply_kind = self._reply_kinds[(kind, m.client_id)]
            replies.append(
                Message(
                    reply_kind,
                    m.client_id,
                    m.step,
                    tuple(t),
                    loss=loss if m.client_id == self.label_client else None,
                )
            )
        return replies

    def _flat_batch(self, kind, cuts, ids, y, w):
        messages = [
            Message(
                kind,
                k,
                0,
                (cut,),
                labels=y if k == self.label_client else None,
                sample_weight=w if k == self.label_client else None,
                ids=i,
            )
            for k, (cut, i) in enumerate(zip(cuts, ids))
        ]
        replies = self.handle_batch(messages)
        self._reply_kinds = getattr(self, "_reply_kinds", {})
        for r in replies:
            self._reply_kinds[(kind, r.client_id)] = r.kind
        loss = replies[self.label_client].loss
        if loss is None:
            loss = tf.constant(0.0)
        return [list(r.tensors) for r in replies], loss

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
        checks = alignment_checks(messages) if self.checks_alignment else []
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
            (self._protected(k, tf.zeros_like(c) if g is None else g, owner.labels),)
            for k, (c, g) in enumerate(zip(cuts, grads))
        ]
        return self._replies(messages, Kind.GRADIENTS, cut_grads, loss)

    def _protected(self, client_id, gradient, labels):
        """A client's cut gradient as sent: with Marvell-style noise unless
        the client holds the labels (or the noise is off)."""
        if client_id == self.label_client or not self.marvell_strength:
            return gradient
        return marvell_noise(
            gradient,
            labels,
            self.marvell_strength,
            self._seeds,
            num_classes_of(self.segment),
        )

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


def alignment_checks(messages) -> list:
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
