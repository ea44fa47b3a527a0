"""The server party: the middle segment, its optimizer, and (vanilla) the loss.

The server sees only what clients send: cut tensors (and labels in the
vanilla configuration). It answers with the gradients of the loss with
respect to those tensors. In the U-shaped configuration it sends its outputs
down and waits for their gradients before it can answer.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras.parties.segment_party import SegmentParty
from splitkeras.parties.segment_step import apply_gradients, regularization
from splitkeras.protocol import Kind, Message

__all__ = ["Server"]


class Server(SegmentParty):
    """The server of a split model.

    Args:
      segment: the server segment (cut tensors -> logits or server outputs).
      optimizer: the server's optimizer.
      objective: vanilla only: `objective(y, y_pred, sample_weight, training)`
        returning the loss (and updating metrics). None for U-shaped, where
        the labels stay on the clients.
    """

    def __init__(self, segment, optimizer, objective=None):
        self.segment = segment
        self.optimizer = optimizer
        self.objective = objective
        self._open_steps = {}

    @property
    def holds_labels(self) -> bool:
        return self.objective is not None

    def handle(self, message: Message) -> Message:
        """Answers one message."""
        if message.kind == Kind.TRAIN:
            if self.holds_labels:
                return self._train_vanilla(message)
            step = self._train_ushaped(message)
            reply = next(step)
            self._open_steps[message.client_id] = step
            return reply
        if message.kind == Kind.OUTPUT_GRADIENTS:
            step = self._open_steps.pop(message.client_id, None)
            if step is None:
                raise ValueError(
                    f"OUTPUT_GRADIENTS from client {message.client_id} for step "
                    f"{message.step} without a TRAIN message before it"
                )
            return step.send(message)
        if message.kind in (Kind.EVALUATE, Kind.PREDICT):
            return self._infer(message)
        raise ValueError(f"the server cannot handle a {message.kind.name} message")

    def _inputs(self, message):
        tensors = list(message.tensors)
        return tensors, (tensors[0] if len(tensors) == 1 else tensors)

    def _train_vanilla(self, message):
        if message.labels is None:
            raise ValueError(
                f"TRAIN message from client {message.client_id} has no labels, "
                "but this server holds the loss (vanilla). Send labels, or run "
                "a U-shaped split (cut at two layers)."
            )
        cut, inputs = self._inputs(message)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(cut)
            y_pred = self.segment(inputs, training=True)
            loss = self.objective(message.labels, y_pred, message.sample_weight, True)
            reg = regularization(self.segment)
            total = loss if reg is None else loss + reg
        grads = tape.gradient(total, cut + variables)
        apply_gradients(self.optimizer, grads[len(cut) :], variables)
        return self._reply(
            message, Kind.GRADIENTS, _cut_gradients(grads, cut), loss=loss
        )

    def _train_ushaped(self, message):
        cut, inputs = self._inputs(message)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(cut)
            outputs = tf.nest.flatten(self.segment(inputs, training=True))
            reg = regularization(self.segment)
        answer = yield self._reply(message, Kind.SERVER_OUTPUT, outputs)
        targets, seeds = list(outputs), list(answer.tensors)
        if reg is not None:
            targets.append(reg)
            seeds.append(tf.ones_like(reg))
        grads = tape.gradient(targets, cut + variables, output_gradients=seeds)
        apply_gradients(self.optimizer, grads[len(cut) :], variables)
        yield self._reply(message, Kind.GRADIENTS, _cut_gradients(grads, cut))

    def _infer(self, message):
        _, inputs = self._inputs(message)
        outputs = self.segment(inputs, training=False)
        if message.kind == Kind.EVALUATE and self.holds_labels:
            loss = self.objective(message.labels, outputs, message.sample_weight, False)
            return self._reply(message, Kind.ACK, (), loss=loss)
        return self._reply(message, Kind.SERVER_OUTPUT, tf.nest.flatten(outputs))

    @staticmethod
    def _reply(message, kind, tensors, loss=None):
        return Message(
            kind=kind,
            client_id=message.client_id,
            step=message.step,
            tensors=tuple(tensors),
            loss=loss,
        )


def _cut_gradients(grads, cut) -> list:
    """The cut tensors' gradients; zeros for a tensor the segment does not use."""
    return [tf.zeros_like(c) if g is None else g for g, c in zip(grads, cut)]
