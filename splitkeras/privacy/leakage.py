"""Leakage measured during training: dCor(raw inputs, what the server gets).

On a fixed evaluation set (the first `config.privacy.leakage_examples` test
examples, so every run of a config measures the same inputs) the client's
cut tensors, as they would be sent (inference mode, plus the activation
noise if that defense is on), are compared with the raw inputs by distance
correlation: 1 means the server could recover a function of the input up to
a similarity transform, 0 means independence.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras.privacy.attacks.label_leakage import label_leakage
from splitkeras.privacy.defenses import flat_batch, from_config
from splitkeras.privacy.distance_correlation import distance_correlation
from splitkeras.protocol import flat

__all__ = ["Leakage", "attach_privacy", "clients_of"]


def clients_of(trainer) -> list:
    """The `Client` parties of a SplitModel or a schedule (may be empty)."""
    if hasattr(trainer, "clients"):
        return list(trainer.clients)
    client = getattr(trainer, "client", None)
    return [] if client is None else [client]


def _newest_client(trainer):
    """The client whose segment the server would see next."""
    clients = clients_of(trainer)
    if not clients:
        return None
    return clients[getattr(trainer, "active", 0)]


def attach_privacy(trainer, config) -> None:
    """Gives every client of `trainer` the defenses of `config.privacy`."""
    if from_config(config) is None:
        return
    clients = clients_of(trainer)
    if not clients:
        raise ValueError(
            f"config.privacy defenses need client segments; config.method="
            f"{config.method!r} has none"
        )
    for client in clients:
        # Each client's noise is its own (seeded by its id), as in a process
        # of its own.
        client.privacy = from_config(config, client.client_id)


class Leakage:
    """Measures `leakage_dcor` of a trainer's newest client segment.

    Args:
      config: the experiment config (`config.privacy.leakage_examples`; 0
        turns the measurement off).
      arrays: the dataset; its first test examples are the fixed set.
    """

    def __init__(self, config, arrays):
        # Streams (imagenet2012) have no fixed test arrays: nothing measured.
        available = len(arrays.x_test) if hasattr(arrays, "x_test") else 0
        n = min(int(config.privacy.leakage_examples), available)
        self.enabled = n > 0 and config.topology != "vertical"
        if self.enabled:
            ds = data_lib.eval_dataset(arrays.x_test[:n], arrays.y_test[:n], n)
            self.x, self.y = next(iter(ds))
        # Per-example gradients at the scale of a training batch's mean loss.
        self._batch_size = int(config.train.batch_size)
        self._noise = None
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def __call__(self, trainer) -> dict:
        """{"leakage_dcor": value}, or {} when there is nothing to measure."""
        client = _newest_client(trainer) if self.enabled else None
        if client is None:
            return {}
        cut = flat(client.segment(self.x, training=False))
        if client.privacy is not None and client.privacy.activation_noise:
            # The noise the server would see, from a generator of its own so
            # that measuring does not shift the training noise.
            if self._noise is None:
                self._noise = dataclasses.replace(
                    client.privacy, seed=client.privacy.seed + 7919
                )
            cut = self._noise.noised(cut)
        value = distance_correlation(flat_batch(self.x), flat_batch(cut))
        logs = {"leakage_dcor": float(value)}
        server = getattr(trainer, "server", None)
        if client.tail is not None and server is not None:
            logs.update(self._label_leakage(client, server.segment, cut))
        return logs

    def _label_leakage(self, client, server_segment, cut) -> dict:
        """U-shaped: what the server's output gradients tell about the labels.

        The gradients of the loss with respect to the server's outputs, at
        the scale of a training batch's mean loss and as the client would send
        them (after its gradient
        protection), scored by Li et al.'s norm and cosine attacks for one
        class against the rest (class 0: binary, as in their setting).
        """
        outputs = tf.nest.flatten(
            server_segment(cut[0] if len(cut) == 1 else list(cut), training=False)
        )
        with tf.GradientTape() as tape:
            tape.watch(outputs)
            y_pred = client.tail(outputs[0] if len(outputs) == 1 else outputs)
            n = tf.cast(tf.shape(self.y)[0], tf.float32)
            loss = self._loss(self.y, y_pred) * n / self._batch_size
        grads = tape.gradient(loss, outputs)
        if client.privacy is not None:
            grads = client.privacy.protect_gradients(grads)
        aucs = label_leakage(flat_batch(grads).numpy(), np.equal(self.y, 0))
        return {f"label_leak_{k}": float(v) for k, v in aucs.items()}
