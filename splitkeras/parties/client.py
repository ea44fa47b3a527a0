"""The client party: raw data, the first segment, and (U-shaped) the tail.

A client never sends raw inputs. It sends its cut tensors, receives their
gradients and applies ``tape.gradient(cut, vars, output_gradients=grads)``
with its own optimizer. In the U-shaped configuration it also keeps the
labels and the loss: it runs the tail on the server's outputs and sends back
only the gradients of those outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.parties.microbatches import pieces
from splitkeras.parties.segment_step import (
    apply_gradients,
    loss_scale,
    regularization,
    skipped,
    wire_dtype,
)
from splitkeras.privacy.defenses import NoPeekTerm
from splitkeras.privacy.marvell import num_classes_of
from splitkeras.protocol import Kind, Message, flat

__all__ = ["Client", "Forward"]


class Forward(NamedTuple):
    """A client forward pass waiting for its gradients."""

    tape: tf.GradientTape
    cut: tuple
    reg: tf.Tensor | None
    nopeek: NoPeekTerm | None = None


class Client:
    """One client of a split model.

    Args:
      segment: the client's (head) segment: raw inputs -> cut tensors.
      optimizer: the client's optimizer (updates head and tail weights).
      client_id: this client's id in the messages it sends.
      tail: the U-shaped tail segment (server outputs -> predictions), or None.
      objective: U-shaped only: `objective(y, y_pred, sample_weight, training)`
        returning the loss (and updating metrics).
      privacy: a `splitkeras.privacy.ClientPrivacy` (NoPeek loss, noise on
        the activations, protection of the output gradients), or None. It
        can also be set later (`client.privacy = ...`) before the first step.
    """

    def __init__(
        self,
        segment,
        optimizer,
        client_id=0,
        tail=None,
        objective=None,
        privacy=None,
    ):
        if tail is not None and objective is None:
            raise ValueError(
                "a U-shaped client holds the labels and needs an objective "
                "(the loss); pass objective=..."
            )
        self.segment = segment
        self.tail = tail
        self.optimizer = optimizer
        self.client_id = client_id
        self.objective = objective
        self.privacy = privacy

    @property
    def trainable_variables(self) -> list:
        tail = self.tail.trainable_variables if self.tail is not None else []
        return list(self.segment.trainable_variables) + list(tail)

    def build_optimizer(self):
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def _message(self, kind, step, tensors, y=None, sample_weight=None, ids=None):
        keep_labels = self.tail is not None
        return Message(
            kind=kind,
            client_id=self.client_id,
            step=step,
            tensors=tensors,
            labels=None if keep_labels else y,
            sample_weight=None if keep_labels else sample_weight,
            ids=None if ids is None else tf.cast(ids, tf.int64),
        )

    def forward(self, x) -> Forward:
        """Runs the client segment under a fresh tape (training mode).

        The returned `Forward` lives only as long as the caller's step: pass
        it to `backward` once the cut tensors' gradients arrive.
        """
        # The normalized NoPeek step takes dCor's gradient apart: two
        # gradients from one tape.
        two = self.privacy is not None and self.privacy.normalized
        nopeek = None
        with tf.GradientTape(persistent=two) as tape:
            # Mixed precision: 16-bit cut tensors cross in float32 (wire_dtype).
            cut = tuple(
                tf.cast(c, wire_dtype(c.dtype))
                for c in flat(self.segment(x, training=True))
            )
            reg = regularization(self.segment)
            if self.privacy is not None:
                # NoPeek "loss": alpha * dCor joins the regularization term;
                # "normalized": backward adds its own step (nopeek_gradients).
                cut, reg, nopeek = self.privacy.protect_activations(
                    x, cut, reg, encode=self._encode
                )
        return Forward(tape, cut, reg, nopeek)

    def _encode(self, x) -> tuple:
        """The cut tensors of `x` in inference mode (NoPeek's re-encoded
        window), as `forward` casts them."""
        return tuple(
            tf.cast(c, wire_dtype(c.dtype))
            for c in flat(self.segment(x, training=False))
        )

    def backward(self, forward: Forward, gradients, tail_grads=()) -> None:
        """Applies the cut tensors' `gradients` (and the tail's) in one update."""
        head_vars = self.segment.trainable_variables
        targets, seeds = list(forward.cut), list(gradients)
        if forward.reg is not None:
            targets.append(forward.reg)
            seeds.append(tf.ones_like(forward.reg))
        scale = loss_scale(self.optimizer)
        if scale is not None:
            # Mixed float16: this client scales its own backward pass (so
            # small gradients do not underflow in float16); its loss scale
            # optimizer unscales, and skips the update on overflow, here
            # also when the server skipped its step (all-zero gradients).
            seeds = [s * tf.cast(scale, s.dtype) for s in seeds]
            server_skipped = skipped(gradients)
            seeds = [
                tf.where(server_skipped, tf.fill(tf.shape(s), np.nan), s) for s in seeds
            ]
            tail_grads = [
                None if g is None else g * tf.cast(scale, g.dtype) for g in tail_grads
            ]
            self.build_optimizer()
            state = [self.optimizer.dynamic_scale, self.optimizer.step_counter]
            kept = [tf.identity(v) for v in state]
        head_grads = forward.tape.gradient(targets, head_vars, output_gradients=seeds)
        updates = None  # the client's updates before this one (NoPeek)
        if self.privacy is not None:
            updates = tf.identity(self.optimizer.iterations)
        if forward.nopeek is not None and self.privacy.normalized:
            # Scaled like the task's backward pass (mixed float16), so that
            # its small values survive; nopeek_gradients rescales it anyway.
            seed = None if scale is None else tf.cast(scale, forward.nopeek.dcor.dtype)
            leak = forward.tape.gradient(
                forward.nopeek.dcor, head_vars, output_gradients=seed
            )
            head_grads = self.privacy.nopeek_gradients(
                head_grads, leak, forward.nopeek.dcor, updates
            )
        tail_vars = self.tail.trainable_variables if self.tail is not None else []
        # One optimizer update for head and tail together, as in the uncut model.
        apply_gradients(
            self.optimizer,
            list(head_grads) + list(tail_grads),
            list(head_vars) + list(tail_vars),
        )
        if self.privacy is not None:
            # NoPeek's window and adapted alpha, unless the update was skipped
            # (the server's overflow or this client's own): the optimizer
            # counts only the updates it applied.
            applied = tf.greater(self.optimizer.iterations, updates)
            self.privacy.remember(forward.nopeek, applied, updates)
        if scale is not None:
            # The overflow was the server's: this client's scale stays.
            for variable, value in zip(state, kept):
                variable.assign(tf.where(server_skipped, value, variable))

    def train_step(
        self, link, step, x, y, sample_weight=None, ids=None, microbatches=1
    ):
        """One training step; returns the loss reported by the label holder.

        `y` None: another party holds the labels (vertical); `ids`: the
        batch's row numbers (vertical). `microbatches` > 1 (vanilla): the
        cut tensors go as that many micro-batches, all sent before the first
        reply is awaited (`splitkeras.parties.microbatches`).
        """
        if microbatches > 1:
            self._unguarded("micro-batched")
            forward = self.forward(x)
            tickets = self._send_pieces(
                link, step, forward.cut, y, sample_weight, microbatches
            )
            grads, loss = self._receive_pieces(link, forward.cut, tickets)
            self.backward(forward, grads)
            return loss
        guard = None if self.privacy is None or y is None else self.privacy.guard
        probe = None
        if guard is not None:
            # A probe of the hijack guard: some labels rotated, no update here
            # (nor any after its alarm, when it freezes the client).
            y, rotated = guard.labels(y, guard.is_probe())
            probe = tf.reduce_any(rotated)
        forward = self.forward(x)
        reply = link.request(
            self._message(Kind.TRAIN, step, forward.cut, y, sample_weight, ids)
        )
        tail_grads, loss = [], reply.loss
        if self.tail is not None:
            tail_grads, out_grads, loss = self._tail_step(reply, y, sample_weight)
            if self.privacy is not None:
                out_grads = self.privacy.protect_gradients(
                    out_grads, y, num_classes_of(self.tail)
                )
            reply = link.request(self._message(Kind.OUTPUT_GRADIENTS, step, out_grads))
        if probe is None:
            self.backward(forward, reply.tensors, tail_grads)
            return loss
        guard.record(probe, reply.tensors, rotated)

        def learn():
            # Tensors from outside the branch, made the branch's own: Keras
            # sums gradients with the replica context's all-reduce (even
            # without a strategy), which wants them from one graph.
            received = [tf.identity(g) for g in reply.tensors]
            tail = [None if g is None else tf.identity(g) for g in tail_grads]
            self.backward(forward, received, tail)
            return tf.constant(True)

        tf.cond(tf.logical_or(probe, guard.frozen()), lambda: tf.constant(False), learn)
        return loss

    # ------------------------------------------ steps that do not wait
    def send_step(self, link, step, x, y, sample_weight=None, microbatches=1):
        """The first half of a step whose gradients come later (vanilla,
        `config.train.max_staleness`): runs the forward pass and sends the
        cut tensors; returns the tickets `finish_step` takes."""
        self._unguarded("asynchronous")
        cut = self.forward(x).cut  # the tape ends here: finish_step recomputes
        return self._send_pieces(link, step, cut, y, sample_weight, microbatches)

    def finish_step(self, link, x, tickets):
        """The second half: waits for the gradients of the cut tensors sent
        with `tickets`, recomputes the forward pass of `x` with the weights
        as they are now, and applies them; returns the reported loss."""
        forward = self.forward(x)
        grads, loss = self._receive_pieces(link, forward.cut, tickets)
        self.backward(forward, grads)
        return loss

    def _unguarded(self, what: str) -> None:
        """The hijack guard probes whole steps that wait for their reply."""
        if self.privacy is not None and self.privacy.guard is not None:
            raise ValueError(
                f"the hijack guard (config.privacy.hijack_probe_every) probes "
                f"steps that wait for their gradients, not {what} ones: set "
                "config.train.microbatches=1 and config.train.max_staleness=0"
            )

    def _send_pieces(self, link, step, cut, y, sample_weight, count):
        """Sends the cut tensors as `count` micro-batches (1: the whole batch
        as one message); returns a ticket per micro-batch."""
        if self.tail is not None:
            raise ValueError(
                "a U-shaped client waits for the server's outputs: micro-batched "
                "and asynchronous steps run vanilla splits"
            )
        if count == 1:
            return [link.send(self._message(Kind.TRAIN, step, cut, y, sample_weight))]
        rows = tf.shape(cut[0], out_type=tf.int64)[0]
        tickets = []
        for first, end in pieces(rows, count):
            piece = self._message(
                Kind.TRAIN,
                step,
                tuple(c[first:end] for c in cut),
                _rows(y, first, end),
                _rows(sample_weight, first, end),
            ).replace(offset=first, rows=rows)
            tickets.append(_unless_empty(end > first, link, piece))
        return tickets

    def _receive_pieces(self, link, cut, tickets):
        """The cut tensors' gradients and the loss, from every ticket."""
        if len(tickets) == 1:
            reply = link.receive(tickets[0], Kind.TRAIN)
            return list(reply.tensors), reply.loss
        rows = tf.shape(cut[0], out_type=tf.int64)[0]
        grads, losses = [], []
        for ticket, (first, end) in zip(tickets, pieces(rows, len(tickets))):

            def received(ticket=ticket):
                reply = link.receive(ticket, Kind.TRAIN)
                return list(reply.tensors), tf.cast(reply.loss, tf.float32)

            def skipped(first=first, end=end):  # an empty micro-batch
                return [c[first:end] * 0 for c in cut], tf.constant(0.0)

            piece_grads, loss = tf.cond(end > first, received, skipped)
            grads.append(piece_grads)
            losses.append(loss)
        # The server reports each micro-batch's share of the batch's loss.
        return [tf.concat(g, axis=0) for g in zip(*grads)], tf.add_n(losses)

    def _tail_step(self, reply, y, sample_weight):
        outputs = list(reply.tensors)
        tail_vars = self.tail.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(outputs)
            y_pred = self.tail(_unflat(outputs), training=True)
            loss = self.objective(y, y_pred, sample_weight, True)
            reg = regularization(self.tail)
            total = loss if reg is None else loss + reg
        grads = tape.gradient(total, outputs + list(tail_vars))
        return grads[len(outputs) :], grads[: len(outputs)], loss

    def infer(self, x) -> tuple:
        """The cut tensors of `x` in inference mode (noised if configured)."""
        cut = self._encode(x)
        if self.privacy is not None:
            cut = self.privacy.noised(cut)
        return cut

    def evaluate_step(self, link, step, x, y, sample_weight=None, ids=None):
        """Runs inference; the label holder updates the metrics."""
        cut = self.infer(x)
        reply = link.request(
            self._message(Kind.EVALUATE, step, cut, y, sample_weight, ids)
        )
        if self.tail is None:
            return reply.loss
        y_pred = self.tail(_unflat(list(reply.tensors)), training=False)
        return self.objective(y, y_pred, sample_weight, False)

    def predict_step(self, link, step, x):
        """Returns the model's predictions for `x`."""
        cut = self.infer(x)
        reply = link.request(self._message(Kind.PREDICT, step, cut))
        outputs = _unflat(list(reply.tensors))
        if self.tail is None:
            return outputs
        return self.tail(outputs, training=False)

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The client's own state: its segments and optimizer, its hijack
        guard's state and NoPeek's adapted alpha if it has them (+ `extra`)."""
        guard = None if self.privacy is None else self.privacy.guard
        if guard is not None:
            extra["hijack_guard"] = tf.train.Checkpoint(**guard.trackables())
        nopeek = {} if self.privacy is None else self.privacy.trackables()
        if nopeek:
            extra["nopeek"] = tf.train.Checkpoint(**nopeek)
        return party_checkpoint([self.segment, self.tail], self.optimizer, **extra)


def _rows(tensor, first, end):
    return None if tensor is None else tensor[first:end]


def _unless_empty(nonempty, link, piece):
    """`link.send(piece)`, or (an empty micro-batch) a ticket of nothing."""
    return tf.cond(nonempty, lambda: link.send(piece), lambda: link.unsent(piece))


def _unflat(tensors):
    return tensors[0] if len(tensors) == 1 else tensors
