"""Synchronous data-parallel SGD across K clients, a baseline for split learning.

At every step each client fetches the current model (FETCH), computes the
gradient of its own batch, and sends it up with its batch size (UPDATE); once
every client taking part in the step has, the server averages the
gradients, weighted by batch size, and applies one optimizer update.
Without batch-norm statistics this is exactly centralized training on the
concatenated batches (the gradient of the mean loss over all examples).

Batch norm: a client's training-mode forward updates its copy's moving
statistics; it sends the updated values with its gradients, and the server
sets the statistics to the step's starting values plus the
batch-size-weighted average of the clients' changes. Accepting each update
in turn would apply the BN momentum K times per step (the statistics would
forget K times faster than in centralized training) and depend on client
order. With the average, the moving mean follows the concatenated batch's
mean exactly and the moving variance uses the clients' own batch variances
(without the spread between client means), as batch norm without
cross-replica sync does under `tf.distribute`. The gradients do not depend
on this choice: in training mode batch norm normalizes with each batch's
own statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.data.pipeline import batches_in
from splitkeras.objective import Objective
from splitkeras.parties.averager import weight_specs
from splitkeras.parties.segment_step import apply_gradients, compiled, regularization
from splitkeras.protocol import Kind, Message, Rejected, Status
from splitkeras.schedules.coordinator import Rounds
from splitkeras.schedules.splitfed import interleave
from splitkeras.schedules.whole_model import (
    ModelClient,
    WholeModelBaseline,
    check_float_weights,
)
from splitkeras.transport.counters import ByteCounters
from splitkeras.transport.local import LocalTransport

__all__ = ["GradientServer", "LargeBatchSGD", "SGDClient"]

_AS_DATA = {Kind.FETCH: "data", Kind.UPDATE: "data", Kind.WEIGHTS: "data"}
_END_OF_ROUND = -1  # FETCH step: the model once the round's steps are applied


class GradientServer:
    """The model and its optimizer; one update per step from the clients'
    averaged gradients and statistics.

    A step s of a round is complete when every client taking part (those
    whose batch count, said at BEGIN, exceeds s; all clients if none said)
    has sent its UPDATE; the average is taken in client order.
    """

    steps_per_batch = 1  # a client's step per batch (the host's step count)

    def __init__(self, model, optimizer, num_clients: int):
        self.model = model
        self.optimizer = optimizer
        self.num_clients = num_clients
        optimizer.build(model.trainable_weights)
        self._trainable = model.trainable_weights
        self._state = model.non_trainable_weights
        self.applied = tf.Variable(0, dtype=tf.int64, trainable=False)  # this round
        self.batches = {}
        self._uploads = {}
        self._apply = compiled(self._apply_step)

    def trackables(self) -> dict:
        return {"applied": self.applied}

    def start_round(self) -> None:
        self.batches, self._uploads = {}, {}
        self.applied.assign(0)

    def begun(self, client_id: int, batches: int) -> None:
        self.batches[client_id] = int(batches)

    def rolled_back(self) -> None:
        self._uploads = {}

    def _taking_part(self, step: int) -> list:
        if not self.batches:
            return list(range(self.num_clients))
        return [k for k in range(self.num_clients) if self.batches.get(k, 0) > step]

    def arrival_specs(self, kind, client_id: int) -> list:
        return weight_specs(self._trainable + self._state)

    def handle(self, message: Message) -> Message:
        if message.kind == Kind.FETCH:
            return self._fetch(message)
        if message.kind == Kind.UPDATE:
            return self._update(message)
        raise Rejected(
            "invalid", f"the server takes FETCH and UPDATE, not {message.kind.name}"
        )

    def _fetch(self, message):
        applied, step = int(self.applied.numpy()), int(message.step)
        if self.batches and len(self.batches) < self.num_clients:
            # Who takes part in a step is known once every client has begun.
            return Message(Kind.WEIGHTS, message.client_id, step, status=Status.WAIT)
        if step == _END_OF_ROUND:
            last = (
                max(self.batches.values(), default=applied) if self.batches else applied
            )
            ready = applied >= last
        else:
            ready = step == applied
            if step < applied:
                raise Rejected(
                    "restart",
                    f"client {message.client_id} fetches the model of step {step}; "
                    f"the server has applied {applied} steps this round",
                )
        if not ready:
            return Message(Kind.WEIGHTS, message.client_id, step, status=Status.WAIT)
        weights = tuple(tf.identity(w) for w in self.model.weights)
        return Message(Kind.WEIGHTS, message.client_id, step, tensors=weights)

    def _update(self, message):
        k, step = message.client_id, int(message.step)
        applied = int(self.applied.numpy())
        if step < applied:  # a step redone after a restart: already applied
            return Message(Kind.ACK, k, step)
        if step > applied:
            raise Rejected(
                "restart", f"client {k} sends step {step}; the server is at {applied}"
            )
        self._uploads[k] = (message.tensors, int(message.count))
        taking_part = self._taking_part(step)
        if all(j in self._uploads for j in taking_part):
            self._apply_uploads(taking_part)
        return Message(Kind.ACK, k, step)

    def _apply_uploads(self, taking_part) -> None:
        total = sum(self._uploads[k][1] for k in taking_part)
        n = len(self._trainable)
        grads = [tf.zeros_like(v) for v in self._trainable]
        changes = [tf.zeros_like(v) for v in self._state]
        for k in taking_part:  # in client order: the same sums everywhere
            tensors, count = self._uploads[k]
            fraction = count / total
            grads = [
                g + tf.cast(fraction, g.dtype) * t for g, t in zip(grads, tensors[:n])
            ]
            changes = [
                c + tf.cast(fraction, c.dtype) * (t - v)
                for c, t, v in zip(changes, tensors[n:], self._state)
            ]
        self._apply(grads, changes)
        self._uploads = {}
        self.applied.assign_add(1)

    def _apply_step(self, grads, changes):
        apply_gradients(self.optimizer, list(grads), self._trainable)
        for variable, change in zip(self._state, changes):
            variable.assign_add(change)


class SGDClient(ModelClient):
    """One client of large-batch SGD: the server's model, its gradient."""

    # BEGIN's batch count of a dataset of unknown length is counted (the
    # server's steps gather the gradients of the clients with a batch left).
    counts_unknown = True

    def __init__(self, client_id, model, objective, link, jit_compile=False):
        super().__init__(client_id, model, None, objective, link, jit_compile)
        self._trainable = model.trainable_weights
        self._state = model.non_trainable_weights
        self.compute = compiled(self._gradient, jit_compile=jit_compile)

    def _gradient(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.objective(y, self.model(x, training=True))
            reg = regularization(self.model)
            total = loss if reg is None else loss + reg
        # A trainable weight the loss does not reach gets a zero gradient.
        grads = tape.gradient(
            total, self._trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return loss, list(grads) + [tf.identity(v) for v in self._state]

    def step(self, epoch: int, step: int, x, y):
        """One synchronous step: fetch the model, send the batch's gradient."""
        self.load(self.link.poll(self._message(Kind.FETCH, epoch, step)))
        loss, tensors = self.compute(x, y)
        size = int(tf.nest.flatten(x)[0].shape[0])
        self.link.request(
            self._message(Kind.UPDATE, epoch, step, tensors=tuple(tensors), count=size)
        )
        return loss, size

    def train(self, epoch: int, dataset):
        """The round's steps (one yield each); then END."""
        self.objective.reset(training=True)
        examples = 0
        for step, (x, y) in enumerate(dataset):
            loss, size = self.step(epoch, step, x, y)
            examples += size
            yield loss
        self.end(epoch, examples)

    def finish(self, epoch: int, test=None) -> None:
        """The evaluating client fetches the round's final model and reports."""
        if test is not None:
            self.load(self.link.poll(self._message(Kind.FETCH, epoch, _END_OF_ROUND)))
            self.report(epoch, test)


class LargeBatchSGD(WholeModelBaseline):
    """Large-batch synchronous SGD: K clients, one model, one optimizer.

    Per client and per step it takes part in, `byte_counts` counts the model
    sent down (all weights, fetched before the step) and the client's update
    sent up (the gradients of the trainable weights and the updated
    non-trainable weights, e.g. batch-norm statistics).

    Args:
      build_model: zero-argument callable returning a fresh, built keras.Model
        (the caller seeds it).
      num_clients: K, the number of clients.
      make_optimizer: zero-argument callable returning a new Keras optimizer.
      loss: a Keras loss (name or instance), reduced over the batch.
      metrics: metric names or instances for training and evaluation.
      jit_compile: compile the steps with XLA.
    """

    def __init__(
        self,
        build_model: Callable[[], keras.Model],
        num_clients: int,
        make_optimizer: Callable[[], keras.optimizers.Optimizer],
        loss,
        metrics=("accuracy",),
        jit_compile: bool = False,
    ):
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(
                f"num_clients must be a positive integer, got {num_clients!r}"
            )
        self.num_clients = num_clients
        self.model = build_model()
        check_float_weights(self.model, "LargeBatchSGD")
        self.optimizer = make_optimizer()
        self.server = GradientServer(self.model, self.optimizer, num_clients)
        self.coordinator = Rounds(self.server, num_clients)
        self.counters = ByteCounters.for_categories(("data",), num_clients)
        link = LocalTransport(
            self.coordinator, num_clients, counters=self.counters, categories=_AS_DATA
        )
        self.programs = [
            SGDClient(k, build_model(), Objective(loss, metrics), link, jit_compile)
            for k in range(num_clients)
        ]
        self._init_evaluation(loss, metrics, jit_compile)

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [self.optimizer]

    @property
    def served_model(self):
        return self.model

    def round(self, epoch, client_datasets, test=None, skip=0):
        datasets = self._check_count(client_datasets)
        for program, dataset in zip(self.programs, datasets):
            program.begin(epoch, batches_in(dataset, program.counts_unknown))
        yield from interleave(
            p.train(epoch, d) for p, d in zip(self.programs, datasets)
        )
        for k, program in enumerate(self.programs):
            program.finish(epoch, test if k == 0 else None)

    def train_step(self, client_batches) -> None:
        """One step on K (x, y) batches, one per client, in client order."""
        client_batches = self._check_count(client_batches, "client batches")
        self.server.batches = {}  # every client takes part
        step = int(self.server.applied.numpy())
        for program, (x, y) in zip(self.programs, client_batches):
            program.step(self.epoch, step, x, y)

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The server's state: the model and the optimizer (+ `extra`)."""
        return party_checkpoint(
            [self.model], self.optimizer, **extra, **self.server.trackables()
        )
