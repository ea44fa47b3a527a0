"""Federated averaging (McMahan et al. 2017), a baseline for split learning.

Each round every client receives the global model, trains its own copy on its
own data for `local_epochs` passes and sends the weights back; the server
replaces the global weights with their average, weighted by the number of
examples each client trained on. Every weight of the model is averaged,
trainable or not (batch-norm moving statistics included); Dropout's seed
states are not weights and stay with each copy. Weights travel as float32:
`byte_counts` reports one model down and one model up per client per round.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.parties.segment_step import (
    apply_gradients,
    compiled,
    regularization,
)
from splitkeras.schedules.whole_model import WholeModelBaseline

__all__ = ["FedAvg"]

_WIRE_BYTES = 4  # float32 per weight on the wire


class FedAvg(WholeModelBaseline):
    """FedAvg over `num_clients` in-process clients.

    Each client has its own model instance, optimizer and compiled train step,
    built once and reused every round. Local optimizer state does not persist
    across rounds, as in McMahan's FedAvg: at the start of each round the
    client's optimizer variables (step count, momentum, Adam moments, ...) are
    reset to the values they had when freshly built, which is the same as a
    new `make_optimizer()` but keeps the traced step valid.

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
        self.local_epochs = local_epochs
        self.global_model = build_model()
        self.local_models = [build_model() for _ in range(num_clients)]
        self._weights = _averageable_weights(self.global_model)
        self._local_weights = [m.weights for m in self.local_models]
        for local in self._local_weights:
            _check_same_shapes(self._weights, local)
        self.optimizers = [make_optimizer() for _ in range(num_clients)]
        for model, optimizer in zip(self.local_models, self.optimizers):
            optimizer.build(model.trainable_weights)
        self._fresh_optimizer_state = [
            [v.numpy() for v in o.variables] for o in self.optimizers
        ]
        self._steps = [
            compiled(self._local_step(m, o), jit_compile=jit_compile)
            for m, o in zip(self.local_models, self.optimizers)
        ]
        self._model_bytes = _WIRE_BYTES * sum(_size(w) for w in self._weights)
        self._init_baseline(num_clients, loss, metrics, jit_compile)

    @property
    def served_model(self):
        return self.global_model

    @property
    def num_clients(self) -> int:
        return len(self.local_models)

    def _local_step(self, model, optimizer):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = self.objective(y, model(x, training=True))
                reg = regularization(model)
                total = loss if reg is None else loss + reg
            grads = tape.gradient(total, model.trainable_weights)
            apply_gradients(optimizer, grads, model.trainable_weights)

        return step

    def train_round(self, client_datasets) -> dict:
        """One round: every client trains from the global weights, then average.

        Args:
          client_datasets: K `tf.data.Dataset`s of (x, y) batches, one per
            client, in client order.

        Returns:
          The mean training loss and metrics over all clients' batches.

        Raises:
          ValueError: if there is not one dataset per client, or no client
            has any example.
        """
        client_datasets = list(client_datasets)
        if len(client_datasets) != self.num_clients:
            raise ValueError(
                f"got {len(client_datasets)} client datasets for "
                f"{self.num_clients} clients; pass one per client"
            )
        self.objective.reset(training=True)
        examples = [self._train_client(k, d) for k, d in enumerate(client_datasets)]
        self._average(examples)
        return self.objective.result(training=True)

    def _train_client(self, k: int, dataset) -> int:
        """Client k trains a copy of the global model; returns examples seen."""
        for local, weight in zip(self._local_weights[k], self._weights):
            local.assign(weight)
        self.counters.add("bytes_down", k, self._model_bytes)
        optimizer = self.optimizers[k]
        rate = float(optimizer.learning_rate)  # this epoch's (learning_rate.py)
        for variable, value in zip(optimizer.variables, self._fresh_optimizer_state[k]):
            variable.assign(value)
        optimizer.learning_rate = rate
        seen = 0
        for _ in range(self.local_epochs):
            for x, y in dataset:
                self._steps[k](x, y)
                seen += int(tf.nest.flatten(x)[0].shape[0])
        self.counters.add("bytes_up", k, self._model_bytes)
        return seen

    def _average(self, examples: list) -> None:
        total = sum(examples)
        if total == 0:
            raise ValueError(
                f"no client has any example this round (examples per client: "
                f"{examples}); pass non-empty client datasets"
            )
        fractions = [n / total for n in examples]
        for i, weight in enumerate(self._weights):
            # Averaging the updates (not the weights) leaves a weight that no
            # client changed, such as a frozen layer's, bit-identical.
            update = tf.add_n(
                [
                    f * (local[i] - weight)
                    for f, local in zip(fractions, self._local_weights)
                ]
            )
            weight.assign_add(update)

    def train_epoch(self, client_datasets) -> dict:
        """One round per epoch (the experiment runner's interface)."""
        return self.train_round(client_datasets)

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The server's state: the global model (+ `extra`, e.g. a round counter).

        Local models and optimizers are not saved: every round starts them
        afresh from the global weights.
        """
        return party_checkpoint([self.global_model], **extra)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _averageable_weights(model) -> list:
    weights = model.weights
    if not weights:
        raise ValueError(
            f"model {model.name!r} from build_model has no weights; return a "
            "built model (e.g. a functional model on keras.Input)"
        )
    other = [w.path for w in weights if not keras.backend.is_float_dtype(w.dtype)]
    if other:
        raise ValueError(
            f"FedAvg averages weights, but {other} of model {model.name!r} are "
            "not floating point"
        )
    return weights


def _check_same_shapes(expected: list, got: list) -> None:
    shapes, other = [tuple(w.shape) for w in expected], [tuple(w.shape) for w in got]
    if shapes != other:
        raise ValueError(
            "build_model returned models of different architectures: weight "
            f"shapes {shapes} and {other}; return the same model at every call"
        )


def _size(weight) -> int:
    return int(np.prod(weight.shape))
