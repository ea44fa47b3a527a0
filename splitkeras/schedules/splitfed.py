"""SplitFed: split learning with federated averaging (Thapa et al., AAAI 2022).

Every round, K clients train "in parallel", each on its own shard with its own
copy of the client segment (and, U-shaped, of the tail) and its own
optimizer. In this in-process simulation they run one after another, but each
starts the round from the same averaged weights and nothing one client does
changes another's starting point. At the end of the round the fed server
averages the client segments (FedAvg: weighted by the examples each client
trained on that round) and every client receives the average. The main
server comes in two versions:

- SFLV1 (`version=1`): one server-segment copy per client, each a `Server`
  party with its own optimizer; client k talks only to copy k. At round end
  the main server averages its copies with the same weighting and every copy
  gets the average.
- SFLV2 (`version=2`): one server segment, trained on the clients one after
  the other (client 0's whole shard, then client 1's, ...); its optimizer
  state carries on from client to client.

Averaged are all weights, trainable or not (batch-norm statistics included).
Dropout seed states are not weights: each copy keeps its own. Optimizer
states are not averaged and not reset: every party keeps its own across
rounds (the paper averages weights only; keeping the state makes one client
equal to centralized training). Client-segment weights travel as float32: each
client sends its weights up and receives the average down once per round,
counted apart from the activation and gradient bytes of the transport. The
example count that travels with each upload (one integer) is not counted, as
in the FedAvg baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from splitkeras.cut import cut
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.segment_step import compiled
from splitkeras.protocol import Message
from splitkeras.transport.codec import as_pair
from splitkeras.transport.local import LocalTransport

__all__ = ["FedServer", "ServerCopies", "SplitFed", "weighted_average"]

VERSIONS = (1, 2)
_WIRE_BYTES = 4  # client-segment weights travel as float32


class SplitFed:
    """SplitFed (SFLV1 or SFLV2) over K clients and one main server.

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
        trained on the clients in turn).
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
        segments = [cut(build_model(), at) for _ in range(num_clients)]
        self.ushaped = segments[0].ushaped
        self.clients, self.servers = self._parties(
            segments, make_optimizer, loss, metrics
        )
        _check_same_start([client_weights(c) for c in self.clients], "client")
        _check_same_start([s.segment.weights for s in self.servers], "server")
        # What the transport talks to: SFLV1's copies, or SFLV2's one server.
        self.server = ServerCopies(self.servers) if version == 1 else self.servers[0]
        self.transport = LocalTransport(self.server, num_clients, *as_pair(codec))
        self.fed_server = FedServer(num_clients)
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._train_fns = [
            self._compile(c.train_step, run_eagerly, jit_compile) for c in self.clients
        ]
        self._evaluate_fn = self._compile(
            self.clients[0].evaluate_step, run_eagerly, jit_compile
        )

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [p.optimizer for p in [*self.clients, *self.servers]]

    def _parties(self, segments, make_optimizer, loss, metrics):
        """The clients, and the server copies (one per client in SFLV1)."""

        def objective(label_holder):
            return Objective(loss, metrics) if label_holder else None

        clients = [
            Client(s.client, make_optimizer(), k, s.tail, objective(self.ushaped))
            for k, s in enumerate(segments)
        ]
        copies = len(segments) if self.version == 1 else 1
        servers = [
            Server(s.server, make_optimizer(), objective(not self.ushaped))
            for s in segments[:copies]
        ]
        for party in [*clients, *servers]:
            party.build_optimizer()
        return clients, servers

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def _compile(self, step, run_eagerly, jit_compile):
        def run(x, y):
            return step(self.transport, self._step.assign_add(1), x, y)

        return compiled(run, run_eagerly, jit_compile)

    def _label_holder(self, k) -> Objective:
        if self.ushaped:
            return self.clients[k].objective
        return self.servers[k if self.version == 1 else 0].objective

    def _holders(self) -> list:
        if self.ushaped:
            return [c.objective for c in self.clients]
        return [s.objective for s in self.servers]

    def train_epoch(self, client_datasets) -> dict:
        """One round: every client trains on its shard, then the averaging.

        Args:
          client_datasets: K datasets of (x, y) batches, one per client, in
            client order.

        Returns:
          The training loss and metrics over all clients' examples.

        Raises:
          ValueError: if there is not one dataset per client, or no client has
            any example.
        """
        holders = self._holders()
        for objective in holders:
            objective.reset(training=True)
        examples = self.train_clients(client_datasets)
        self.aggregate(examples)
        counts = examples if len(holders) == len(examples) else [sum(examples)]
        return _weighted_mean([o.result(training=True) for o in holders], counts)

    def train_clients(self, client_datasets) -> list[int]:
        """The local half of a round (no averaging); returns examples per client.

        Each client trains from the weights it holds: after `aggregate`, the
        same average for every client.
        """
        client_datasets = list(client_datasets)
        if len(client_datasets) != self.num_clients:
            raise ValueError(
                f"got {len(client_datasets)} client datasets for "
                f"{self.num_clients} clients; pass one per client"
            )
        return [self._train_client(k, d) for k, d in enumerate(client_datasets)]

    def _train_client(self, k: int, dataset) -> int:
        step, seen = self._train_fns[k], 0
        for x, y in dataset:
            step(x, y)
            seen += int(tf.nest.flatten(x)[0].shape[0])
        return seen

    def aggregate(self, examples: Sequence[int]) -> None:
        """The averaging half of a round, weighted by `examples` per client.

        The fed server averages the client segments (weights up, average
        down); in SFLV1 the main server also averages its copies.
        """
        if sum(examples) == 0:
            raise ValueError(
                f"no client has any example this round (examples per client: "
                f"{list(examples)}); pass non-empty client datasets"
            )
        for client, n in zip(self.clients, examples):
            self.fed_server.upload(client.client_id, client_weights(client), n)
        self.fed_server.average()
        for client in self.clients:
            _assign(client_weights(client), self.fed_server.download(client.client_id))
        if self.version == 1:
            self.server.average(examples)

    def evaluate(self, dataset) -> dict:
        """Evaluates client 0 (the averaged client segment) with its server.

        In SFLV1 that is server copy 0, which holds the average after a round.
        """
        objective = self._label_holder(0)
        objective.reset(training=False)
        for x, y in dataset:
            self._evaluate_fn(x, y)
        return objective.result(training=False)

    def byte_counts(self) -> dict:
        """Per-client bytes: activations up, gradients down, and aggregation."""
        return {**self.transport.byte_counts(), **self.fed_server.byte_counts()}

    def checkpoints(self, **extra) -> dict:
        """One checkpoint per party: each client's own state, the server's.

        A client's checkpoint holds its segments, optimizer and byte counters;
        the server's holds its segment and optimizer (SFLV1: every copy's,
        as `copy_k`).
        """
        parties = {
            f"client_{c.client_id}": c.checkpoint(
                **extra,
                **self.transport.counters_of(c.client_id),
                **self.fed_server.counters_of(c.client_id),
            )
            for c in self.clients
        }
        if self.version == 1:
            copies = {f"copy_{k}": s.checkpoint() for k, s in enumerate(self.servers)}
            parties["server"] = tf.train.Checkpoint(**copies, **extra)
        else:
            parties["server"] = self.servers[0].checkpoint(**extra)
        return parties

    def resumed(self, epochs_done: int) -> None:
        """After a restore: nothing to redo.

        Every round ends with all clients (and SFLV1 server copies) holding
        the average, which is what the checkpoints restore.
        """
        del epochs_done


class ServerCopies:
    """SFLV1's main server: one `Server` per client, addressed by client id."""

    def __init__(self, copies: Sequence[Server]):
        self.copies = list(copies)

    def handle(self, message: Message) -> Message:
        """Client k's message goes to copy k."""
        return self.copies[message.client_id].handle(message)

    def average(self, examples: Sequence[int]) -> None:
        """Every copy gets the copies' weights averaged, weighted by `examples`."""
        weights = [c.segment.weights for c in self.copies]
        average = weighted_average(weights, examples)
        for copy_weights in weights:
            _assign(copy_weights, average)


class FedServer:
    """Averages the clients' segment weights; it sees nothing else.

    Each client uploads its weights (float32) with the number of examples it
    trained on this round, and downloads the weighted average. Bytes are
    counted per client, as variables so that checkpoints keep them.

    Args:
      num_clients: the number of clients.
    """

    def __init__(self, num_clients: int):
        def counter():
            return tf.Variable(0, dtype=tf.int64, trainable=False)

        self.sent = [counter() for _ in range(num_clients)]
        self.received = [counter() for _ in range(num_clients)]
        self._uploads = {}
        self._average = None

    def upload(self, client_id: int, weights, examples: int) -> None:
        """Client `client_id` sends its weights and example count."""
        arrays = [np.asarray(w, np.float32) for w in weights]
        self._uploads[client_id] = (arrays, examples)
        self.sent[client_id].assign_add(_nbytes(arrays))

    def average(self) -> None:
        """Averages this round's uploads (weighted by examples)."""
        ids = sorted(self._uploads)
        uploads = [self._uploads.pop(k) for k in ids]
        self._average = weighted_average(
            [w for w, _ in uploads], [n for _, n in uploads]
        )

    def download(self, client_id: int) -> list[np.ndarray]:
        """Client `client_id` receives the average."""
        if self._average is None:
            raise ValueError("the fed server has no average yet: call average()")
        self.received[client_id].assign_add(_nbytes(self._average))
        return self._average

    def counters_of(self, client_id: int) -> dict:
        """One client's aggregation counters (variables), for its checkpoint."""
        return {
            "aggregation_bytes_sent": self.sent[client_id],
            "aggregation_bytes_received": self.received[client_id],
        }

    def byte_counts(self) -> dict:
        return {
            "aggregation_bytes_sent": [int(v.numpy()) for v in self.sent],
            "aggregation_bytes_received": [int(v.numpy()) for v in self.received],
        }


def client_weights(client: Client) -> list:
    """The weights a client shares for averaging: head (and tail) weights."""
    tail = client.tail.weights if client.tail is not None else []
    return list(client.segment.weights) + list(tail)


def weighted_average(weight_lists, examples: Sequence[int]) -> list[np.ndarray]:
    """Per weight, sum_k n_k w_k / sum_k n_k, accumulated in float64.

    Args:
      weight_lists: per party, its weights (arrays or variables), in the same
        order and shapes for every party.
      examples: n_k per party.

    Returns:
      The averaged weights, in the parties' dtypes. A weight that every party
      holds with the same value comes back bit-identical.
    """
    total = sum(examples)
    average = []
    for i, first in enumerate(weight_lists[0]):
        acc = np.zeros(tuple(first.shape), np.float64)
        for weights, n in zip(weight_lists, examples):
            if n:
                acc += n * np.asarray(weights[i], np.float64)
        average.append((acc / total).astype(np.dtype(first.dtype)))
    return average


def _assign(variables, values) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


def _nbytes(arrays) -> int:
    return _WIRE_BYTES * sum(int(a.size) for a in arrays)


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


def _weighted_mean(results: list, counts: list) -> dict:
    total = sum(counts)
    if total == 0:
        return results[0]
    return {
        key: sum(n * r[key] for r, n in zip(results, counts)) / total
        for key in results[0]
    }
