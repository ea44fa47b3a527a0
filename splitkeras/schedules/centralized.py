"""Centralized training: the uncut model on one party, the baseline of every table.

One party holds the whole model, all the data and the labels; nothing
travels. It trains on the same batches in the same order, from the same
initial weights, as the split schedules, so their results can be compared
step for step.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.objective import Objective
from splitkeras.parties.segment_step import apply_gradients, compiled, regularization
from splitkeras.schedules.base import Schedule

__all__ = ["Centralized"]


class Centralized(Schedule):
    """The uncut model trained by one party.

    Args:
      model: the uncut Keras model.
      optimizer: its optimizer (a `LossScaleOptimizer` under mixed_float16).
      loss: the Keras loss.
      metrics: metric names.
      run_eagerly / jit_compile: how the step is compiled.
    """

    resumable_mid_round = True
    num_clients = 1

    def __init__(
        self,
        model,
        optimizer,
        loss,
        metrics=("accuracy",),
        run_eagerly=False,
        jit_compile=False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.optimizer.build(model.trainable_variables)
        self.objective = Objective(loss, metrics)
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._logs = {}
        self._train_fn = compiled(self._train_step, run_eagerly, jit_compile)
        self._eval_fn = compiled(self._eval_step, run_eagerly, jit_compile)

    @property
    def optimizers(self) -> list:
        return [self.optimizer]

    @property
    def epoch(self) -> int:
        return int(self._epoch.numpy())

    def _train_step(self, x, y):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.objective(y, y_pred, None, True)
            reg = regularization(self.model)
            total = loss if reg is None else loss + tf.cast(reg, loss.dtype)
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                total = self.optimizer.scale_loss(total)
        apply_gradients(self.optimizer, tape.gradient(total, variables), variables)
        return loss

    def _eval_step(self, x, y):
        return self.objective(y, self.model(x, training=False), None, False)

    def round(self, epoch, client_datasets, test=None, skip=0):
        (dataset,) = self._check_count(client_datasets)
        if not skip:
            self.objective.reset(training=True)
        for x, y in dataset.skip(skip) if skip else dataset:
            yield self._train_fn(x, y)
        train = self.objective.result(training=True)
        val = self.evaluate(test) if test is not None else {}
        self._logs[epoch] = (train, val)
        self._epoch.assign(epoch + 1)

    def round_logs(self, epoch) -> tuple:
        return self._logs[epoch]

    def evaluate(self, dataset) -> dict:
        self.objective.reset(training=False)
        for x, y in dataset:
            self._eval_fn(x, y)
        return self.objective.result(training=False)

    def byte_counts(self) -> dict:
        return {"bytes_up": [0], "bytes_down": [0]}

    def checkpoints(self, **extra) -> dict:
        return {
            "model": party_checkpoint(
                [self.model], self.optimizer, **extra, epoch_done=self._epoch
            )
        }
