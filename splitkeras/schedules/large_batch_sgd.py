"""Synchronous data-parallel SGD across K clients, a baseline for split learning.

At every step each client computes the gradient of its own batch on the same
current model; the server averages the gradients, weighted by batch size, and
applies one optimizer update. Without batch-norm statistics this is exactly
centralized training on the concatenated batches (the gradient of the mean
loss over all examples).

Batch norm: a client's training-mode forward updates the moving statistics,
which all clients share. Every client starts from the statistics the step
began with, and the server sets them to the batch-size-weighted average of
the clients' updated values. Accepting each update in turn would apply the
BN momentum K times per step (the statistics would forget K times faster than
in centralized training) and depend on client order. With the average, the
moving mean follows the concatenated batch's mean exactly and the moving
variance uses the clients' own batch variances (without the spread between
client means), as batch norm without cross-replica sync does under
`tf.distribute`. The gradients do not depend on this choice: in training mode
batch norm normalizes with each batch's own statistics.
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

__all__ = ["LargeBatchSGD"]

_WIRE_BYTES = 4  # float32 per number on the wire


class LargeBatchSGD(WholeModelBaseline):
    """Large-batch synchronous SGD: K clients, one model, one optimizer.

    Per client and per step it takes part in, `byte_counts` counts the model
    sent down (all weights, broadcast before the step) and the client's
    update sent up (the gradients of the trainable weights and the updated
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
        _check_float_weights(self.model)
        self.optimizer = make_optimizer()
        self.optimizer.build(self.model.trainable_weights)
        self._trainable = self.model.trainable_weights
        self._state = self.model.non_trainable_weights
        self._gradient_sum = [_zeros_like(v) for v in self._trainable]
        self._state_update_sum = [_zeros_like(v) for v in self._state]
        self._client_step = compiled(self._accumulate, jit_compile=jit_compile)
        self._apply_step = compiled(self._apply, jit_compile=jit_compile)
        self._down_bytes = _WIRE_BYTES * _count(self.model.weights)
        self._up_bytes = _WIRE_BYTES * _count(self._trainable + self._state)
        self._init_baseline(num_clients, loss, metrics, jit_compile)

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [self.optimizer]

    @property
    def served_model(self):
        return self.model

    def _accumulate(self, x, y, fraction, state):
        """One client: its gradient and state update, scaled by `fraction`."""
        for variable, value in zip(self._state, state):
            variable.assign(value)
        with tf.GradientTape() as tape:
            loss = self.objective(y, self.model(x, training=True))
            reg = regularization(self.model)
            total = loss if reg is None else loss + reg
        # A trainable weight the loss does not reach gets a zero gradient.
        grads = tape.gradient(
            total, self._trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        for acc, grad in zip(self._gradient_sum, grads):
            acc.assign_add(tf.cast(fraction, grad.dtype) * grad)
        for acc, variable, value in zip(self._state_update_sum, self._state, state):
            acc.assign_add(tf.cast(fraction, value.dtype) * (variable - value))

    def _apply(self, state):
        """The server: one update with the averaged gradient and state."""
        grads = [tf.identity(acc) for acc in self._gradient_sum]
        apply_gradients(self.optimizer, grads, self._trainable)
        for variable, value, acc in zip(self._state, state, self._state_update_sum):
            variable.assign(value + acc)
        for acc in self._gradient_sum + self._state_update_sum:
            acc.assign(tf.zeros_like(acc))

    def _step(self, batches: list) -> None:
        """One synchronous step over `batches`, a list of (client, (x, y))."""
        sizes = [int(tf.nest.flatten(x)[0].shape[0]) for _, (x, _) in batches]
        total = sum(sizes)
        state = [tf.convert_to_tensor(v) for v in self._state]
        for (k, (x, y)), size in zip(batches, sizes):
            self.counters.add("bytes_down", k, self._down_bytes)
            self._client_step(x, y, tf.constant(size / total, tf.float32), state)
            self.counters.add("bytes_up", k, self._up_bytes)
        self._apply_step(state)

    def _check_count(self, items: list, what: str) -> None:
        if len(items) != self.num_clients:
            raise ValueError(
                f"got {len(items)} {what} for {self.num_clients} clients; "
                "pass one per client"
            )

    def train_step(self, client_batches) -> None:
        """One step on K (x, y) batches, one per client, in client order.

        Training metrics keep running until `train_epoch` resets them.

        Raises:
          ValueError: if there is not one batch per client.
        """
        client_batches = list(client_batches)
        self._check_count(client_batches, "client batches")
        self._step(list(enumerate(client_batches)))

    def train_epoch(self, client_datasets) -> dict:
        """Steps in lockstep over K datasets, one per client.

        When a client's dataset runs out, the others go on without it.

        Returns:
          The mean training loss and metrics over all clients' batches.

        Raises:
          ValueError: if there is not one dataset per client.
        """
        client_datasets = list(client_datasets)
        self._check_count(client_datasets, "client datasets")
        self.objective.reset(training=True)
        iterators = {k: iter(d) for k, d in enumerate(client_datasets)}
        while iterators:
            batches = [(k, next(it, None)) for k, it in iterators.items()]
            for k, batch in batches:
                if batch is None:
                    del iterators[k]
            batches = [(k, b) for k, b in batches if b is not None]
            if batches:
                self._step(batches)
        return self.objective.result(training=True)

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The server's state: the model and the optimizer (+ `extra`)."""
        return party_checkpoint([self.model], self.optimizer, **extra)


def _check_float_weights(model) -> None:
    other = [w.path for w in model.weights if not keras.backend.is_float_dtype(w.dtype)]
    if other:
        raise ValueError(
            f"LargeBatchSGD averages gradients and statistics, but {other} of "
            f"model {model.name!r} are not floating point"
        )


def _zeros_like(variable) -> tf.Variable:
    return tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False)


def _count(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)
