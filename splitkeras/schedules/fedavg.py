"""Federated averaging (McMahan et al. 2017), a baseline for split learning.

Each round every client trains its own copy of the whole model on its own
data for `local_epochs` passes, starting from the global model, and sends
its weights up with its example count (WEIGHTS); the server replaces the
global weights with their average, weighted by examples, and every client
fetches it (FETCH). Every weight is averaged, trainable or not (batch-norm
moving statistics included); Dropout's seed states are not weights and stay
with each copy. Weights travel as float32: `byte_counts` reports one model
up and one model down per client per round.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.data.pipeline import batches_in
from splitkeras.objective import Objective
from splitkeras.parties.averager import Averager
from splitkeras.parties.segment_step import apply_gradients, compiled, regularization
from splitkeras.protocol import Kind
from splitkeras.schedules.coordinator import Rounds
from splitkeras.schedules.splitfed import interleave
from splitkeras.schedules.whole_model import (
    ModelClient,
    WholeModelBaseline,
    check_float_weights,
)
from splitkeras.transport.counters import ByteCounters
from splitkeras.transport.local import LocalTransport

__all__ = ["FedAvg", "FedAvgClient"]

# FedAvg's clients send nothing but weights: count them as their traffic.
WEIGHTS_AS_DATA = {Kind.WEIGHTS: "data", Kind.FETCH: "data"}


class FedAvgClient(ModelClient):
    """One FedAvg client: trains its copy, uploads it, fetches the average.

    Local optimizer state does not persist across rounds, as in McMahan's
    FedAvg: at the start of each round the optimizer's variables (step
    count, momentum, Adam moments, ...) go back to their freshly built
    values, which equals a new optimizer but keeps the traced step valid.
    """

    def __init__(
        self,
        client_id,
        model,
        optimizer,
        objective,
        link,
        local_epochs=1,
        jit_compile=False,
    ):
        super().__init__(client_id, model, optimizer, objective, link, jit_compile)
        optimizer.build(model.trainable_weights)
        self.local_epochs = local_epochs
        self._fresh = [v.numpy() for v in optimizer.variables]
        self.step = compiled(self._train_batch, jit_compile=jit_compile)

    def _train_batch(self, x, y):
        model = self.model
        with tf.GradientTape() as tape:
            loss = self.objective(y, model(x, training=True))
            reg = regularization(model)
            total = loss if reg is None else loss + reg
        grads = tape.gradient(total, model.trainable_weights)
        apply_gradients(self.optimizer, grads, model.trainable_weights)
        return loss

    def train(self, epoch: int, dataset):
        """The round's local training: one yield per step; then WEIGHTS, END."""
        rate = float(self.optimizer.learning_rate)  # this round's (runner)
        for variable, value in zip(self.optimizer.variables, self._fresh):
            variable.assign(value)
        self.optimizer.learning_rate = rate
        self.objective.reset(training=True)
        examples = 0
        for _ in range(self.local_epochs):
            for x, y in dataset:
                yield self.step(x, y)
                examples += int(tf.nest.flatten(x)[0].shape[0])
        weights = tuple(tf.identity(w) for w in self.model.weights)
        self.link.request(
            self._message(Kind.WEIGHTS, epoch, tensors=weights, count=examples)
        )
        self.end(epoch, examples)

    def finish(self, epoch: int, test=None) -> None:
        """Fetches the round's average; the evaluating client then reports."""
        self.load(self.link.poll(self._message(Kind.FETCH, epoch)))
        if test is not None:
            self.report(epoch, test)


class FedAvg(WholeModelBaseline):
    """FedAvg over `num_clients` clients and one averaging server, in one process.

    Args:
      build_model: zero-argument callable returning a fresh, built keras.Model
        of the same architecture at every call (the caller seeds it).
      num_clients: K, the number of clients.
      make_optimizer: zero-argument callable returning a new Keras optimizer.
      loss: a Keras loss (name or instance), reduced over the batch.
      metrics: metric names or instances for training and evaluation.
      local_epochs: passes each client makes over its dataset per round.
      jit_compile: compile the local steps with XLA.
    """

    def __init__(
        self,
        build_model: Callable[[], keras.Model],
        num_clients: int,
        make_optimizer: Callable[[], keras.optimizers.Optimizer],
        loss,
        metrics=("accuracy",),
        local_epochs: int = 1,
        jit_compile: bool = False,
    ):
        _check_positive("num_clients", num_clients)
        _check_positive("local_epochs", local_epochs)
        self.num_clients = num_clients
        self.local_epochs = local_epochs
        self.global_model = build_model()
        check_float_weights(self.global_model, "FedAvg")
        # Counts each client's local steps as its host does (coordinator.step).
        self.server = Averager(num_clients, self.global_model.weights, local_epochs)
        self.coordinator = Rounds(self.server, num_clients)
        self.counters = ByteCounters.for_categories(("data",), num_clients)
        link = LocalTransport(
            self.coordinator,
            num_clients,
            counters=self.counters,
            categories=WEIGHTS_AS_DATA,
        )
        self.programs = []
        for k in range(num_clients):
            model = build_model()
            _check_same_shapes(self.global_model, model)
            self.programs.append(
                FedAvgClient(
                    k,
                    model,
                    make_optimizer(),
                    Objective(loss, metrics),
                    link,
                    local_epochs,
                    jit_compile,
                )
            )
        self._init_evaluation(loss, metrics, jit_compile)

    @property
    def served_model(self):
        return self.global_model

    @property
    def optimizers(self) -> list:
        return [p.optimizer for p in self.programs]

    @property
    def _steps(self) -> list:
        """Each client's compiled local step."""
        return [p.step for p in self.programs]

    def round(self, epoch, client_datasets, test=None, skip=0):
        datasets = self._check_count(client_datasets)
        for program, dataset in zip(self.programs, datasets):
            program.begin(epoch, batches_in(dataset))
        yield from interleave(
            p.train(epoch, d) for p, d in zip(self.programs, datasets)
        )
        for k, program in enumerate(self.programs):
            program.finish(epoch, test if k == 0 else None)

    def train_round(self, client_datasets) -> dict:
        """One round: every client trains from the global weights, then average."""
        return self.train_epoch(client_datasets)

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The server's state: the global model (+ `extra`, e.g. a round counter)."""
        return party_checkpoint([self.global_model], **extra)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_same_shapes(expected, got) -> None:
    shapes = [tuple(w.shape) for w in expected.weights]
    other = [tuple(w.shape) for w in got.weights]
    if shapes != other:
        raise ValueError(
            "build_model returned models of different architectures: weight "
            f"shapes {shapes} and {other}; return the same model at every call"
        )
