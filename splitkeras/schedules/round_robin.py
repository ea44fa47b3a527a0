"""Round-robin split learning over K clients (the original SplitNN).

K clients, each with its own copy of the client segment, its own optimizer
and its own data shard, take turns training with the one server. Before
client k+1 trains, it receives the client state that client k finished
with, sealed with the clients' key: straight from client k ("peer") or
through the server's coordinator, which cannot read it ("server"). Vanilla
(labels at the server) and U-shaped (every client keeps its labels, tail
and loss) both work. With the same batches in the same order, the result
equals training the uncut model on those batches: the handoff carries every
variable, optimizer slots and dropout seed states included.

`KerasTurns` is one Keras client's program (`transport.turns.TurnClient`
with compiled steps); `RoundRobin` runs K of them against one server in one
process. Over gRPC the same program runs in each client's process
(`splitkeras.client_process`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras.checkpointing import party_checkpoint
from splitkeras.cut import cut
from splitkeras.distribute import replicate
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.handoff import pack_state, unpack_state
from splitkeras.parties.segment_step import compiled
from splitkeras.protocol import Status
from splitkeras.schedules.base import Schedule
from splitkeras.schedules.turn_coordinator import Turns
from splitkeras.transport.codec import as_pair
from splitkeras.transport.counters import ByteCounters
from splitkeras.transport.local import LocalTransport
from splitkeras.transport.turns import HANDOFF_MODES, Inbox, TurnClient

__all__ = ["KerasTurns", "RoundRobin", "VariableInbox"]


class VariableInbox(Inbox):
    """An `Inbox` kept in a string variable, so the client's checkpoint has it."""

    def __init__(self, owner: int):
        super().__init__(owner)
        self.variable = tf.Variable(b"", dtype=tf.string, trainable=False)

    def handle(self, message):
        reply = super().handle(message)
        self.variable.assign(self._blob)
        return reply

    def peek(self):
        blob = self.variable.numpy()
        return blob or None


class KerasTurns(TurnClient):
    """A Keras `Client`'s round-robin turns: its steps compiled over `link`.

    Args:
      client: the `Client` party (segment, optimizer, tail and objective
        when U-shaped).
      link: to the coordinator (a `LocalTransport` or a gRPC link).
      num_clients, key, handoff, peer_link, inbox, counters: as
        `TurnClient`.
      run_eagerly / jit_compile: how the steps are compiled.
      microbatches: micro-batches per step (`config.train.microbatches`).
      max_staleness: steps sent ahead of the gradients received
        (`config.train.max_staleness`); each batch's gradients are applied
        `max_staleness` steps later, with its forward pass recomputed.

    Set before a turn: `train_data(epoch, skip)` (the turn's batches) and,
    on the evaluating client, `test_data` (batches) and optionally
    `leakage(client)` (privacy figures to report with the test figures).
    """

    def __init__(
        self,
        client: Client,
        link,
        num_clients: int,
        key,
        handoff: str = "server",
        peer_link=None,
        inbox=None,
        counters=None,
        run_eagerly: bool = False,
        jit_compile: bool = False,
        microbatches: int = 1,
        max_staleness: int = 0,
    ):
        super().__init__(
            link,
            client.client_id,
            num_clients,
            key,
            handoff,
            peer_link,
            inbox,
            counters,
        )
        self.client = client
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._eval_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.max_staleness = max_staleness
        self.train_fn = compiled(
            lambda x, y: client.train_step(
                link, self._step.assign_add(1), x, y, microbatches=microbatches
            ),
            run_eagerly,
            jit_compile,
        )
        # Asynchronous steps: send now, apply the gradients later.
        self.send_fn = compiled(
            lambda x, y: client.send_step(
                link, self._step.assign_add(1), x, y, microbatches=microbatches
            ),
            run_eagerly,
            jit_compile,
        )
        self.finish_fn = compiled(
            lambda x, tickets: client.finish_step(link, x, tickets),
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
        self._initial = pack_state(client)
        self.train_data = None
        self.test_data = None
        self.leakage = None

    @property
    def steps(self) -> int:
        return int(self._step.numpy())

    @steps.setter
    def steps(self, value: int) -> None:
        self._step.assign(value)

    def _train_steps(self, epoch, skip):
        objective = self.client.objective
        if objective is not None and not skip:
            objective.reset(training=True)
        try:
            yield from self._steps(epoch, skip)
        except BaseException:
            # The turn failed (it is begun again) or was abandoned: calls
            # still in flight are cancelled, so the host applies none of them.
            drop = getattr(self.link, "drop_pending", None)
            if drop is not None:
                drop()
            raise

    def _steps(self, epoch, skip):
        if not self.max_staleness:
            for x, y in self.train_data(epoch, skip):
                yield self.train_fn(x, y)
            return
        # Up to max_staleness steps in flight; the turn ends with none.
        waiting = collections.deque()
        for x, y in self.train_data(epoch, skip):
            waiting.append((x, self.send_fn(x, y)))
            if len(waiting) > self.max_staleness:
                yield self.finish_fn(*waiting.popleft())
        while waiting:
            yield self.finish_fn(*waiting.popleft())

    def _metrics(self) -> dict:
        objective = self.client.objective
        if objective is None:
            return {}
        return {k: float(v) for k, v in objective.result(training=True).items()}

    def _evaluate(self) -> dict:
        """Evaluates on `test_data`; the label holder's figures if this client
        holds them (U-shaped), and the privacy figures it measures."""
        objective = self.client.objective
        if objective is not None:
            objective.reset(training=False)
        self._eval_step.assign(0)
        for x, y in self.test_data:
            self.eval_fn(x, y)
        figures = {}
        if objective is not None:
            figures = {k: float(v) for k, v in objective.result(training=False).items()}
        if self.leakage is not None:
            figures.update(self.leakage(self.client))
        return figures

    def _packed_state(self) -> bytes:
        return pack_state(self.client)

    def _load_state(self, plain) -> None:
        # The state carries the previous turn's learning rate; this round's
        # was set on this client's optimizer before the turn: keep it.
        optimizer = self.client.optimizer
        rate = float(optimizer.learning_rate)
        unpack_state(self.client, self._initial if plain is None else plain)
        optimizer.learning_rate = rate

    def checkpoint_state(self) -> dict:
        """What this program adds to its client's checkpoint (its inbox)."""
        if isinstance(self.inbox, VariableInbox):
            return {"inbox": self.inbox.variable}
        return {}


class RoundRobin(Schedule):
    """K clients take turns with one server; client state is handed on.

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
      key: the clients' shared AES key (None: a fresh one for this run).
      run_eagerly: do not compile steps, for debugging.
      server_strategy: a `tf.distribute.Strategy` for the server (vanilla
        only; `splitkeras.distribute`), or None for one device.
      jit_compile: compile the fused steps with XLA.
      microbatches / max_staleness: as `KerasTurns` (vanilla only).
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
        microbatches: int = 1,
        max_staleness: int = 0,
    ):
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if handoff not in HANDOFF_MODES:
            raise ValueError(
                f"unknown weight handoff {handoff!r}; choose one of "
                f"{', '.join(HANDOFF_MODES)}"
            )
        self.num_clients = num_clients
        self.handoff = handoff
        # With steps in flight a checkpoint mid-turn would hold the server
        # ahead of the clients: such a run checkpoints between rounds.
        self.resumable_mid_round = max_staleness == 0
        segments = [cut(build_model(), at) for _ in range(num_clients)]
        ushaped = segments[0].ushaped
        self.server = server_party(
            segments[0].server, make_optimizer, loss, metrics, ushaped, server_strategy
        )
        self.coordinator = Turns(
            self.server, num_clients, store_state=handoff == "server"
        )
        self.counters = ByteCounters.for_categories(("data", "handoff"), num_clients)
        self.transport = LocalTransport(
            self.coordinator, num_clients, *as_pair(codec), counters=self.counters
        )
        self.clients = [
            Client(
                s.client,
                make_optimizer(),
                client_id=k,
                tail=s.tail,
                objective=Objective(loss, metrics) if ushaped else None,
            )
            for k, s in enumerate(segments)
        ]
        for party in [self.server, *self.clients]:
            party.build_optimizer()
        if microbatches > 1:
            self.server.gradient_sums()  # made before any step is compiled
        key = key if key is not None else AESGCM.generate_key(256)
        # The clients' key, kept in their checkpoints: a resumed run still
        # opens the states sealed before it stopped.
        self._key = tf.Variable(key, dtype=tf.string, trainable=False)
        inboxes = [VariableInbox(k) for k in range(num_clients)]
        self.programs = [
            KerasTurns(
                client,
                self.transport,
                num_clients,
                key,
                handoff,
                peer_link=self._peer_link(inboxes, k),
                inbox=inboxes[k],
                counters=self.counters,
                run_eagerly=run_eagerly,
                jit_compile=jit_compile,
                microbatches=microbatches,
                max_staleness=max_staleness,
            )
            for k, client in enumerate(self.clients)
        ]
        self.active = 0  # the client holding the newest client state

    def _peer_link(self, inboxes, k):
        following = inboxes[(k + 1) % self.num_clients]
        return LocalTransport(following, self.num_clients, counters=self.counters)

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [c.optimizer for c in self.clients] + [self.server.optimizer]

    @property
    def ushaped(self) -> bool:
        return self.server.objective is None

    def resumed(self, epochs_done: int) -> None:
        """After a restore: the newest state is the last client's (or the
        client whose turn was interrupted)."""
        _, turn = self.coordinator.position()
        self.active = (turn - 1) % self.num_clients if epochs_done or turn else 0
        for program in self.programs:
            program.set_key(self._key.numpy())

    def round(self, epoch, client_datasets, test=None, skip=0):
        datasets = self._check_count(client_datasets)
        last = self.num_clients - 1
        for k, program in enumerate(self.programs):
            dataset = datasets[k]
            program.train_data = lambda e, s, ds=dataset: ds.skip(s) if s else ds
            program.test_data = test if k == last else None
            status = yield from program.turn(
                epoch, test is not None and k == last, skip
            )
            if status == Status.READY:
                self.active = k
                skip = 0  # only the interrupted turn resumes mid-way
            elif status == Status.PASSED and skip:
                skip -= _length(dataset)

    def take_turn(self, k: int, dataset) -> None:
        """Client k takes its turn of the current round on `dataset`."""
        program = self.programs[k]
        program.train_data = lambda e, s: dataset
        for _ in program.turn(self.epoch):
            pass
        self.active = k

    def evaluate(self, dataset) -> dict:
        """Evaluates with the newest client state (the active client)."""
        program = self.programs[self.active]
        objective = self.server.objective
        if objective is not None:
            objective.reset(training=False)
        program.test_data = dataset
        figures = program._evaluate()
        if objective is not None:
            figures.update(objective.result(training=False))
        return figures

    def byte_counts(self) -> dict:
        """Per-client bytes: activations up, gradients down, handoff."""
        return self.counters.as_dict()

    def checkpoints(self, **extra) -> dict:
        """One checkpoint per party (the clients' own states, the server's)."""
        parties = {
            f"client_{c.client_id}": c.checkpoint(
                **extra,
                **self.counters.of(c.client_id),
                **p.checkpoint_state(),
                handoff_key=self._key,
            )
            for c, p in zip(self.clients, self.programs)
        }
        parties["server"] = party_checkpoint(
            [self.server.segment],
            self.server.optimizer,
            **extra,
            coordinator=tf.train.Checkpoint(**self.coordinator.trackables()),
        )
        return parties


def server_party(segment, make_optimizer, loss, metrics, ushaped, strategy=None):
    """The server party: the label holder when vanilla; on `strategy`'s
    devices if given (vanilla only)."""
    objective = None if ushaped else Objective(loss, metrics)
    if strategy is None:
        return Server(segment, make_optimizer(), objective=objective)
    segment = replicate(segment, strategy)
    with strategy.scope():
        optimizer = make_optimizer()
    return Server(segment, optimizer, objective=objective, strategy=strategy)


def _length(dataset) -> int:
    n = int(dataset.cardinality())
    if n < 0:
        raise ValueError("a run resumed mid-round needs datasets of known length")
    return n
