"""Round-robin split learning over K clients (the original SplitNN).

K clients, each with its own copy of the client segment, its own optimizer
and its own data shard, take turns training with the one server. Before
client k+1 trains, it receives the client-segment state that client k
finished with (`peer` or `server` handoff, see `splitkeras.parties.handoff`).
Vanilla (labels at the server) and U-shaped (every client keeps its labels,
tail and loss) both work. With the same batches in the same order, the result
equals training the uncut model on those batches: the handoff carries every
variable, optimizer slots and dropout seed states included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.cut import cut
from splitkeras.distribute import replicate
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.handoff import WeightRelay, make_handoff
from splitkeras.parties.segment_step import compiled
from splitkeras.transport.codec import as_pair
from splitkeras.transport.local import LocalTransport

__all__ = ["RoundRobin"]


class RoundRobin:
    """K clients take turns with one server; client weights are handed on.

    Args:
      build_model: zero-argument callable returning the uncut model with the
        same initial weights at every call (seed it inside).
      at: the cut layer, or two layers for U-shaped.
      num_clients: K.
      make_optimizer: zero-argument callable returning a new optimizer (one
        per party).
      loss: a Keras loss for the label holder(s).
      metrics: metric names for the label holder(s).
      handoff: "peer" or "server".
      codec: wire codec of the transport: one name (both directions) or an
        (activations, gradients) pair.
      key: the clients' shared AES key for the "server" handoff (None: a
        fresh one for this simulation).
      run_eagerly: do not compile steps, for debugging.
      server_strategy: a `tf.distribute.Strategy` for the server (vanilla
        only; `splitkeras.distribute`), or None for one device.
      jit_compile: compile the fused steps with XLA.
    """

    def __init__(
        self,
        build_model: Callable[[], keras.Model],
        at: str | Sequence[str],
        num_clients: int,
        make_optimizer: Callable[[], keras.optimizers.Optimizer],
        loss,
        metrics=("accuracy",),
        handoff: str = "peer",
        codec: str | tuple[str, str] = "float32",
        key: bytes | None = None,
        run_eagerly: bool = False,
        server_strategy=None,
        jit_compile: bool = False,
    ):
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        segments = [cut(build_model(), at) for _ in range(num_clients)]
        ushaped = segments[0].ushaped
        self.objectives = [Objective(loss, metrics) for _ in range(num_clients)]
        self.server_objective = None if ushaped else Objective(loss, metrics)
        if server_strategy is None:
            self.server = Server(
                segments[0].server, make_optimizer(), objective=self.server_objective
            )
        else:
            server_segment = replicate(segments[0].server, server_strategy)
            with server_strategy.scope():
                optimizer = make_optimizer()
            self.server = Server(
                server_segment,
                optimizer,
                objective=self.server_objective,
                strategy=server_strategy,
            )
        self.clients = [
            Client(
                s.client,
                make_optimizer(),
                client_id=k,
                tail=s.tail,
                objective=self.objectives[k] if ushaped else None,
            )
            for k, s in enumerate(segments)
        ]
        for party in [self.server, *self.clients]:
            party.build_optimizer()
        self.transport = LocalTransport(self.server, num_clients, *as_pair(codec))
        self.relay = WeightRelay()
        self.handoff = make_handoff(handoff, num_clients, self.relay, key)
        self.active = 0  # the client holding the newest client-segment state
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._train_fns = [
            self._compile(c.train_step, run_eagerly, jit_compile) for c in self.clients
        ]
        self._eval_fns = [
            self._compile(c.evaluate_step, run_eagerly, jit_compile)
            for c in self.clients
        ]

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [c.optimizer for c in self.clients] + [self.server.optimizer]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def ushaped(self) -> bool:
        return self.server_objective is None

    def _compile(self, step, run_eagerly, jit_compile=False):
        def run(x, y):
            return step(self.transport, self._step.assign_add(1), x, y)

        return compiled(run, run_eagerly, jit_compile)

    def resumed(self, epochs_done: int) -> None:
        """After a restore: every finished epoch ends with the last client."""
        if epochs_done > 0:
            self.active = self.num_clients - 1

    def _label_holder(self, k) -> Objective:
        return self.objectives[k] if self.ushaped else self.server_objective

    def take_turn(self, k: int, dataset) -> None:
        """Client k receives the newest state, then trains on `dataset`."""
        if k != self.active:
            self.handoff.transfer(self.clients[self.active], self.clients[k])
            self.active = k
        step = self._train_fns[k]
        for x, y in dataset:
            step(x, y)

    def train_epoch(self, client_datasets) -> dict:
        """One turn per client, in order; returns the epoch's training metrics."""
        if len(client_datasets) != self.num_clients:
            raise ValueError(
                f"got {len(client_datasets)} client datasets for "
                f"{self.num_clients} clients"
            )
        for objective in {id(o): o for o in self._holders()}.values():
            objective.reset(training=True)
        started = int(self._step.numpy())
        for k, dataset in enumerate(client_datasets):
            self.take_turn(k, dataset)
        # Batches trained (streams may not know their length beforehand).
        self.steps_in_epoch = int(self._step.numpy()) - started
        return _mean_results([o.result(training=True) for o in self._holders()])

    def _holders(self) -> list:
        return self.objectives if self.ushaped else [self.server_objective]

    def evaluate(self, dataset) -> dict:
        """Evaluates with the newest client state (the active client)."""
        objective = self._label_holder(self.active)
        objective.reset(training=False)
        step = self._eval_fns[self.active]
        for x, y in dataset:
            step(x, y)
        return objective.result(training=False)

    def byte_counts(self) -> dict:
        """Per-client bytes: activations up, gradients down, handoff."""
        return {**self.transport.byte_counts(), **self.handoff.counters.as_dict()}

    def checkpoints(self, **extra) -> dict:
        """One checkpoint per party (the clients' own states, the server's)."""
        parties = {
            f"client_{c.client_id}": c.checkpoint(
                **extra,
                **self.transport.counters_of(c.client_id),
                **self.handoff.counters.of(c.client_id),
            )
            for c in self.clients
        }
        parties["server"] = party_checkpoint(
            [self.server.segment], self.server.optimizer, **extra
        )
        return parties


def _mean_results(results: list) -> dict:
    keys = results[0].keys()
    return {key: sum(r[key] for r in results) / len(results) for key in keys}
