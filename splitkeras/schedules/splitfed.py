"""SplitFed: split learning with federated averaging (Thapa et al., AAAI 2022).

Every round, K clients train in parallel, each on its own shard with its own
copy of the client segment (and, U-shaped, of the tail) and its own
optimizer, from the weights all of them hold after the last round. Then
each uploads its weights and example count to the fed server (WEIGHTS); once
all have, it averages them (FedAvg: weighted by examples) and every client
fetches the average (FETCH). The main server comes in two versions:

- SFLV1 (`version=1`): one server-segment copy per client, each a `Server`
  party with its own optimizer; client k talks only to copy k. Once every
  client has ended the round, the main server averages its copies with the
  same weighting and every copy gets the average.
- SFLV2 (`version=2`): one server segment, trained on every client's steps
  in turn: step 1 of client 0, step 1 of client 1, ..., step 2 of client 0,
  ... (a client whose shard has run out drops out). Its optimizer state
  carries on from step to step. The order is fixed, so clients compute in
  parallel while the server keeps to it (over gRPC the host holds a step
  until its turn).

Averaged are all weights, trainable or not (batch-norm statistics included).
Dropout seed states are not weights: each copy keeps its own. Optimizer
states are not averaged and not reset: every party keeps its own across
rounds (the paper averages weights only; keeping the state makes one client
equal to centralized training). Client weights travel as float32 (the
weight codec), counted as aggregation bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from splitkeras.cut import cut
from splitkeras.data.pipeline import batches_in
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.averager import Averager, weight_specs
from splitkeras.parties.segment_step import compiled
from splitkeras.parties.splitfed_servers import OrderedServer, ServerCopies
from splitkeras.protocol import Kind, Message, Status
from splitkeras.schedules.base import Schedule
from splitkeras.schedules.coordinator import Rounds
from splitkeras.transport.codec import as_pair
from splitkeras.transport.counters import ByteCounters
from splitkeras.transport.local import LocalTransport

__all__ = ["FedClient", "SplitFed", "interleave"]

VERSIONS = (1, 2)


def client_weights(client: Client) -> list:
    """The weights a client shares for averaging: head (and tail) weights."""
    return segment_weights(client.segment, client.tail)


def segment_weights(segment, tail=None) -> list:
    """The weights of a client's segment (and U-shaped, its tail), in the
    order they are averaged."""
    return list(segment.weights) + (list(tail.weights) if tail is not None else [])


class FedClient:
    """One client's part of a SplitFed round, written against its links.

    Args:
      client: the `Client` party.
      link: to the main server's coordinator (steps, BEGIN, END, REPORT).
      fed_link: to the fed server (WEIGHTS, FETCH).
      run_eagerly / jit_compile: how the steps are compiled.
    """

    # BEGIN's batch count of a dataset of unknown length is counted (the
    # main server's step order of SplitFed v2 needs it): `batches_in`.
    counts_unknown = True

    def __init__(
        self, client: Client, link, fed_link, run_eagerly=False, jit_compile=False
    ):
        self.client = client
        self.link = link
        self.fed_link = fed_link
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._eval_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_fn = compiled(
            lambda x, y: client.train_step(link, self._step.assign_add(1), x, y),
            run_eagerly,
            jit_compile,
        )
        self.eval_fn = compiled(
            lambda x, y: client.evaluate_step(
                link, self._eval_step.assign_add(1), x, y
            ),
            run_eagerly,
            jit_compile,
        )
        self.leakage = None

    @property
    def client_id(self) -> int:
        return self.client.client_id

    def _message(self, kind, epoch, **fields) -> Message:
        return Message(
            kind, self.client_id, int(self._step.numpy()), round=epoch, **fields
        )

    def begin(self, epoch: int, batches: int) -> Status:
        """Begins round `epoch` (waits for the last one to end), saying how
        many batches this client trains in it."""
        return self.link.poll(self._message(Kind.BEGIN, epoch, count=batches)).status

    def train(self, epoch: int, dataset):
        """Round `epoch`'s local half, once begun: one yield per step; then
        WEIGHTS to the fed server and END."""
        objective = self.client.objective
        if objective is not None:
            objective.reset(training=True)
        examples = 0
        for x, y in dataset:
            loss = self.train_fn(x, y)
            examples += int(tf.nest.flatten(x)[0].shape[0])
            yield loss
        weights = tuple(tf.identity(w) for w in client_weights(self.client))
        self.fed_link.request(
            self._message(Kind.WEIGHTS, epoch, tensors=weights, count=examples)
        )
        metrics = {}
        if objective is not None:
            metrics = {k: float(v) for k, v in objective.result(training=True).items()}
        self.link.request(
            self._message(Kind.END, epoch, count=examples, metrics=metrics)
        )

    def finish(self, epoch: int, test=None) -> None:
        """Round `epoch`'s end: fetch the average (after every upload); the
        evaluating client (`test` given) then evaluates and REPORTs."""
        average = self.fed_link.poll(self._message(Kind.FETCH, epoch))
        for variable, value in zip(client_weights(self.client), average.tensors):
            variable.assign(value)
        if test is not None:
            figures = self.evaluate(test)
            self.link.poll(self._message(Kind.REPORT, epoch, metrics=figures))

    def evaluate(self, dataset) -> dict:
        """Sends `dataset` for evaluation; the figures this client holds."""
        objective = self.client.objective
        if objective is not None:
            objective.reset(training=False)
        self._eval_step.assign(0)
        for x, y in dataset:
            self.eval_fn(x, y)
        figures = {}
        if objective is not None:
            figures = {k: float(v) for k, v in objective.result(training=False).items()}
        if self.leakage is not None:
            figures.update(self.leakage(self.client))
        return figures


def interleave(generators):
    """Runs generators step by step in turn (0, 1, ..., 0, 1, ...), yielding
    what they yield; finished ones drop out. Returns their return values."""
    generators = list(generators)
    results = [None] * len(generators)
    live = list(range(len(generators)))
    while live:
        for i in list(live):
            try:
                yield next(generators[i])
            except StopIteration as stop:
                results[i] = stop.value
                live.remove(i)
    return results


class SplitFed(Schedule):
    """SplitFed (SFLV1 or SFLV2) over K clients, a main server and a fed server.

    Args:
      build_model: zero-argument callable returning the uncut model with the
        same initial weights at every call (seed it inside).
      at: the cut layer, or two layers for U-shaped.
      num_clients: K.
      make_optimizer: zero-argument callable returning a new optimizer (one
        per party, and one per server copy in SFLV1).
      loss: a Keras loss for the label holder(s).
      metrics: metric names for the label holder(s).
      version: 1 (a server copy per client, averaged) or 2 (one server,
        trained on the clients' steps in turn).
      codec: wire codec of the transport: one name (activations and
        gradients) or an (activations, gradients) pair.
      run_eagerly: do not compile steps, for debugging.
      jit_compile: compile the steps with XLA.

    Raises:
      ValueError: for an unknown version, fewer than one client, or a
        `build_model` whose calls return different initial weights.
    """

    def __init__(
        self,
        build_model: Callable[[], keras.Model],
        at: str | Sequence[str],
        num_clients: int,
        make_optimizer: Callable[[], keras.optimizers.Optimizer],
        loss,
        metrics=("accuracy",),
        version: int = 1,
        codec: str | tuple[str, str] = "float32",
        run_eagerly: bool = False,
        jit_compile: bool = False,
    ):
        if version not in VERSIONS:
            raise ValueError(
                f"unknown SplitFed version {version!r}; choose 1 (SFLV1: a server "
                "copy per client, averaged) or 2 (SFLV2: one server, clients in turn)"
            )
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.version = version
        self.num_clients = num_clients
        segments = [cut(build_model(), at) for _ in range(num_clients)]
        self.ushaped = segments[0].ushaped
        self.clients, self.servers = self._parties(
            segments, make_optimizer, loss, metrics
        )
        _check_same_start([client_weights(c) for c in self.clients], "client")
        _check_same_start([s.segment.weights for s in self.servers], "server")
        # What the coordinator hands steps to: SFLV1's copies, SFLV2's server.
        if version == 1:
            self.server = ServerCopies(self.servers)
        else:
            self.server = OrderedServer(self.servers[0], num_clients)
        self.coordinator = Rounds(
            self.server,
            num_clients,
            on_trained=self.server.average if version == 1 else None,
        )
        self.fed_server = Averager(
            num_clients, weight_specs(client_weights(self.clients[0]))
        )
        self.counters = ByteCounters.for_categories(
            ("data", "aggregation"), num_clients
        )
        self.transport = LocalTransport(
            self.coordinator, num_clients, *as_pair(codec), counters=self.counters
        )
        self.fed_link = LocalTransport(
            self.fed_server, num_clients, counters=self.counters
        )
        self.programs = [
            FedClient(c, self.transport, self.fed_link, run_eagerly, jit_compile)
            for c in self.clients
        ]

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [p.optimizer for p in [*self.clients, *self.servers]]

    def _parties(self, segments, make_optimizer, loss, metrics):
        """The clients, and the server copies (one per client in SFLV1)."""
        shared = None if self.ushaped else Objective(loss, metrics)
        clients = [
            Client(
                s.client,
                make_optimizer(),
                k,
                s.tail,
                Objective(loss, metrics) if self.ushaped else None,
            )
            for k, s in enumerate(segments)
        ]
        copies = len(segments) if self.version == 1 else 1
        servers = [
            Server(s.server, make_optimizer(), shared) for s in segments[:copies]
        ]
        for party in [*clients, *servers]:
            party.build_optimizer()
        return clients, servers

    def round(self, epoch, client_datasets, test=None, skip=0):
        datasets = self._check_count(client_datasets)
        for program, dataset in zip(self.programs, datasets):
            program.begin(epoch, batches_in(dataset, program.counts_unknown))
        yield from interleave(
            p.train(epoch, d) for p, d in zip(self.programs, datasets)
        )
        for k, program in enumerate(self.programs):
            program.finish(epoch, test if k == 0 else None)

    def train_clients(self, client_datasets) -> list[int]:
        """The local half of a round alone (no averaging); returns examples
        per client. Each client trains from the weights it holds."""
        datasets = self._check_count(client_datasets)
        epoch = self.epoch
        examples = []
        for program in self.programs[: len(datasets)]:
            program.fed_link = _Discard()
            program.link = _NoOrchestration(self.transport)
        try:
            for _ in interleave(
                p.train(epoch, d) for p, d in zip(self.programs, datasets)
            ):
                pass
        finally:
            for program in self.programs:
                examples.append(program.fed_link.count)
                program.fed_link, program.link = self.fed_link, self.transport
        return examples

    def evaluate(self, dataset) -> dict:
        """Evaluates client 0 (the averaged client segment) with its server.

        In SFLV1 that is server copy 0, which holds the average after a round.
        """
        objective = self.server.objective
        if objective is not None:
            objective.reset(training=False)
        figures = self.programs[0].evaluate(dataset)
        if objective is not None:
            figures.update(objective.result(training=False))
        return figures

    def byte_counts(self) -> dict:
        """Per-client bytes: activations up, gradients down, and aggregation."""
        return self.counters.as_dict()

    def checkpoints(self, **extra) -> dict:
        """One checkpoint per party: each client's own state, the server's.

        A client's checkpoint holds its segments, optimizer and byte counters;
        the server's holds its segment and optimizer (SFLV1: every copy's,
        as `copy_k`), the round position and the fed server's average.
        """
        parties = {
            f"client_{c.client_id}": c.checkpoint(
                **extra, **self.counters.of(c.client_id)
            )
            for c in self.clients
        }
        copies = {f"copy_{k}": s.checkpoint() for k, s in enumerate(self.servers)}
        parties["server"] = tf.train.Checkpoint(
            **copies,
            **extra,
            coordinator=tf.train.Checkpoint(**self.coordinator.trackables()),
            fed=tf.train.Checkpoint(**self.fed_server.trackables()),
        )
        return parties


class _Discard:
    """A fed link that takes the upload and keeps only its example count."""

    count = 0

    def request(self, message):
        self.count = int(message.count)
        return Message(Kind.ACK, message.client_id)


class _NoOrchestration:
    """The steps' link, with BEGIN and END answered without a coordinator."""

    def __init__(self, transport):
        self.transport = transport

    def request(self, message):
        if message.kind in (Kind.BEGIN, Kind.END):
            return Message(message.kind, message.client_id, round=message.round)
        return self.transport.request(message)

    poll = request


def _check_same_start(weight_lists, party: str) -> None:
    """All copies of a segment must start equal, and be averageable."""
    first = weight_lists[0]
    other = [w.path for w in first if not keras.backend.is_float_dtype(w.dtype)]
    if other:
        raise ValueError(
            f"SplitFed averages {party} weights, but {other} are not floating point"
        )
    for k, weights in enumerate(weight_lists[1:], start=1):
        for a, b in zip(first, weights):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise ValueError(
                    f"build_model gave {party} copy {k} other initial weights "
                    f"than copy 0 (first difference: {b.path}); seed it inside "
                    "build_model so that every call returns the same model"
                )
