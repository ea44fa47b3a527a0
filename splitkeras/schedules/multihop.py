"""Multi-hop split learning (Vepakomma et al. 2018, "Split learning for health").

The model is cut at two (or more) layers. The client holds the first
segment and the raw data, one intermediate party (a `Relay`) holds each
middle segment, and the server holds the last segment and the loss:

```
client: x ─seg 0─► a ─hop_0─► relay: a ─seg 1─► b ─hop_1─► server: b ─seg 2─► loss(y)
client ◄─dL/da─ relay (applies its update) ◄─dL/db─ server (applies its update)
```

Each hop is its own `LocalTransport`, which encodes with the codec and counts
the bytes of every message it carries. Multi-hop is vanilla: the labels
travel with the cut tensors to the server, so every intermediate party sees
them (never the raw inputs). Every party applies one optimizer update per
step, so with the same batches the result equals training the uncut model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from splitkeras.cut import cut
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.relay import Relay
from splitkeras.parties.segment_step import compiled, optimizer_factory
from splitkeras.protocol import Kind, Message
from splitkeras.schedules.base import Schedule
from splitkeras.schedules.coordinator import Rounds
from splitkeras.transport.codec import as_pair
from splitkeras.transport.local import LocalTransport

__all__ = ["MultiHop", "hop_segments"]


def hop_segments(model: keras.Model, at: Sequence[str]) -> list[keras.Model]:
    """Cuts `model` at two or more layers into client, relay(s), server segments.

    Two layers give `cut(model, at)`'s three segments (its "tail" is the
    server's here); each further layer cuts the last segment again.

    Raises:
      ValueError: fewer than two layers, or a cut `cut` refuses.
    """
    names = (at,) if isinstance(at, str) else tuple(at)
    if len(names) < 2:
        raise ValueError(
            f"multi-hop needs at least two cut layers (client | relay | server); "
            f"got {list(names)}. Use a vanilla split for one cut layer."
        )
    segments = list(cut(model, names[:2]))
    for name in names[2:]:
        segments[-1:] = list(cut(segments[-1], name))
    return segments


class MultiHop(Schedule):
    """Client -> relay(s) -> server, each with its own segment and optimizer.

    Args:
      model: the uncut functional or Sequential Keras model; the segments
        share its layers, so training them trains `model`.
      at: two layer names (client | relay | server), or more for a chain of
        relays, from input to output.
      make_optimizer: zero-argument callable returning a new optimizer (one
        per party), or an optimizer name.
      loss: the Keras loss the server computes.
      metrics: metrics the server tracks ("accuracy": sparse categorical).
      codec: the wire codec of every hop: one name (both directions) or an
        (activations, gradients) pair.
      run_eagerly: run steps eagerly instead of as `tf.function`s.
      jit_compile: compile the steps with XLA.

    Attributes:
      client: the `Client` (segment 0, the raw data).
      relays: the `Relay`s, relay i holding segment i + 1.
      server: the `Server` (last segment, the loss and metrics).
      hops: the `LocalTransport`s; hop i carries party i's messages to
        party i + 1 (the client is party 0, the server the last party).
    """

    def __init__(
        self,
        model: keras.Model,
        at: Sequence[str],
        make_optimizer: Callable[[], keras.optimizers.Optimizer],
        loss,
        metrics=("accuracy",),
        codec: str | tuple[str, str] = "float32",
        run_eagerly: bool = False,
        jit_compile: bool = False,
    ):
        make = optimizer_factory(make_optimizer)
        first, *middle, last = hop_segments(model, at)
        self.objective = Objective(loss, metrics)
        self.server = Server(last, make(), objective=self.objective)
        self.coordinator = Rounds(self.server, 1)
        self.num_clients = 1
        # Built from the server backwards: each party needs its link onward.
        self.hops = [LocalTransport(self.coordinator, 1, *as_pair(codec))]
        self.relays = []
        for segment in reversed(middle):
            relay = Relay(segment, make(), link=self.hops[0])
            self.relays.insert(0, relay)
            self.hops.insert(0, LocalTransport(relay, 1, *as_pair(codec)))
        self.client = Client(first, make(), client_id=0)
        for party in self.parties.values():
            party.build_optimizer()
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        steps = (self._train_step, self._evaluate_step, self._predict_step)
        steps = [compiled(f, run_eagerly, jit_compile) for f in steps]
        self._train_fn, self._evaluate_fn, self._predict_fn = steps

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [p.optimizer for p in self.parties.values()]

    @property
    def parties(self) -> dict:
        """{"client_0", "relay" (or "relay_0", "relay_1", ...), "server"}."""
        if len(self.relays) == 1:
            relays = {"relay": self.relays[0]}
        else:
            relays = {f"relay_{i}": r for i, r in enumerate(self.relays)}
        return {"client_0": self.client, **relays, "server": self.server}

    def _train_step(self, x, y):
        return self.client.train_step(self.hops[0], self._step.assign_add(1), x, y)

    def _evaluate_step(self, x, y):
        return self.client.evaluate_step(self.hops[0], self._step, x, y)

    def _predict_step(self, x):
        return self.client.predict_step(self.hops[0], self._step, x)

    def train_step(self, x, y) -> tf.Tensor:
        """One training step on a batch; returns the server's loss."""
        return self._train_fn(x, y)

    def round(self, epoch, client_datasets, test=None, skip=0):
        """Round `epoch`: BEGIN (through every hop to the server), the steps,
        END; with `test`, the evaluation and its REPORT."""
        if isinstance(client_datasets, (list, tuple)) and len(client_datasets) == 1:
            (client_datasets,) = client_datasets
        self._control(Kind.BEGIN, epoch)
        examples = 0
        for x, y in client_datasets:
            yield self._train_fn(x, y)
            examples += int(tf.nest.flatten(x)[0].shape[0])
        self._control(Kind.END, epoch, count=examples)
        if test is not None:
            self.evaluate(test)
            self._control(Kind.REPORT, epoch)

    def _control(self, kind, epoch, **fields):
        self.hops[0].poll(Message(kind, 0, round=epoch, **fields))

    def evaluate(self, dataset) -> dict:
        """Mean loss and metrics over `dataset`'s `(x, y)` batches."""
        self.objective.reset(training=False)
        for x, y in dataset:
            self._evaluate_fn(x, y)
        return self.objective.result(training=False)

    def predict(self, x, batch_size=None) -> tf.Tensor:
        """The model's outputs for `x` (through every hop), in batches."""
        n = len(x)
        size = batch_size or max(n, 1)
        return tf.concat(
            [self._predict_fn(x[i : i + size]) for i in range(0, n, size)], axis=0
        )

    def byte_counts(self) -> dict:
        """Bytes carried so far, per hop and direction.

        Returns:
          {"hop_0/bytes_up": [n], "hop_0/bytes_down": [n], "hop_1/bytes_up":
          ...}: hop i links party i to party i + 1 (hop 0: client -> first
          relay; the last hop: last relay -> server). Each value lists the
          bytes per sender on that hop (one), as `LocalTransport` does.
        """
        counts = {}
        for i, hop in enumerate(self.hops):
            for key, values in hop.byte_counts().items():
                counts[f"hop_{i}/{key}"] = values
        return counts

    def checkpoints(self, **extra) -> dict:
        """One checkpoint per party, each holding only its own state.

        The sender on each hop (the client on hop 0, relay i on hop i + 1)
        keeps that hop's byte counters.
        """
        state = {"multihop_step": self._step, **extra}
        senders = [self.client, *self.relays]
        out = {}
        for name, party in self.parties.items():
            counters = {}
            if party is not self.server:
                counters = self.hops[senders.index(party)].counters_of(0)
            if party is self.server:
                counters = {
                    "coordinator": tf.train.Checkpoint(**self.coordinator.trackables())
                }
            out[name] = party.checkpoint(**state, **counters)
        return out
