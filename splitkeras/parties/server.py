"""The server party: the middle segment, its optimizer, and (vanilla) the loss.

The server sees only what clients send: cut tensors (and labels in the
vanilla configuration). It answers with the gradients of the loss with
respect to those tensors. In the U-shaped configuration it sends its outputs
down and waits for their gradients before it can answer.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras.distribute import gather, split_batch
from splitkeras.parties.microbatches import GradientSums, is_piece, last_piece, share
from splitkeras.parties.paused_step import PausedStep
from splitkeras.parties.segment_party import SegmentParty
from splitkeras.parties.segment_step import (
    all_finite,
    apply_gradients,
    compiled,
    loss_scale,
    regularization,
    skip_unless,
    specs_of,
    unscale,
    wire_dtype,
)
from splitkeras.protocol import Kind, Message, Rejected

__all__ = ["Server"]


class Server(SegmentParty):
    """The server of a split model.

    Args:
      segment: the server segment (cut tensors -> logits or server outputs).
      optimizer: the server's optimizer.
      objective: vanilla only: `objective(y, y_pred, sample_weight, training)`
        returning the loss (and updating metrics). None for U-shaped, where
        the labels stay on the clients.
      strategy: a `tf.distribute.Strategy` whose scope holds `segment`'s and
        `optimizer`'s variables (`splitkeras.distribute.replicate`), or None
        for one device. Each batch is split over the replicas; the loss is
        averaged over the global batch, so updates and the cut tensors'
        gradients equal the one-device server's. Vanilla only.
    """

    def __init__(self, segment, optimizer, objective=None, strategy=None):
        if strategy is not None and objective is None:
            raise ValueError(
                "a distributed server (strategy=...) runs vanilla splits; a "
                "U-shaped server holds its tape between two messages, which "
                "does not span replicas"
            )
        self.segment = segment
        self.optimizer = optimizer
        self.objective = objective
        self.strategy = strategy
        # client -> its U-shaped step between messages (a generator, or the
        # PausedStep its compiled graph pauses in)
        self._open_steps = {}
        self._paused_fn = None
        self._sums = None  # GradientSums of micro-batched steps

    def build_optimizer(self):
        if self.strategy is None:
            return super().build_optimizer()
        with self.strategy.scope():
            return super().build_optimizer()

    @property
    def holds_labels(self) -> bool:
        return self.objective is not None

    # ------------------------------------------ what a host checks against
    @property
    def compiled_kinds(self) -> tuple:
        """Kinds a host may compile `handle` for (U-shaped training holds
        its tape between two messages: eager)."""
        if self.holds_labels:
            return (Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT)
        return (Kind.EVALUATE, Kind.PREDICT)

    def takes_labels(self, client_id: int) -> bool:
        return self.holds_labels

    @property
    def num_classes(self) -> int:
        return int(self.segment.outputs[0].shape[-1] or 0)

    def arrival_specs(self, kind, client_id: int) -> list:
        return specs_of(self.segment.inputs)

    def output_specs(self) -> list:
        return specs_of(self.segment.outputs)

    def pending(self, client_id: int) -> bool:
        """True while a U-shaped step of `client_id` waits for its gradients."""
        return client_id in self._open_steps

    def handle(self, message: Message) -> Message:
        """Answers one message."""
        if message.kind == Kind.TRAIN:
            if self.holds_labels:
                return self._train_vanilla(message)
            if is_piece(message):
                raise ValueError(
                    "a U-shaped server takes whole batches: micro-batched "
                    "steps (config.train.microbatches > 1) run vanilla splits"
                )
            self._cancel(message.client_id)  # a step begun again
            if self._paused_fn is not None:
                return self._start_paused(message)
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
            if isinstance(step, PausedStep):
                grads = step.resume(list(message.tensors))
                return self._reply(message, Kind.GRADIENTS, grads)
            return step.send(message)
        if message.kind in (Kind.EVALUATE, Kind.PREDICT):
            return self._infer(message)
        raise Rejected(
            "invalid", f"the server cannot handle a {message.kind.name} message"
        )

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
        if self.strategy is not None:
            return self._train_distributed(message)
        cut, inputs = self._inputs(message)
        variables = self.trainable_variables
        scale = loss_scale(self.optimizer)
        piece = is_piece(message)
        if piece:
            self._check_piece(scale)
        with tf.GradientTape() as tape:
            tape.watch(cut)
            y_pred = self.segment(inputs, training=True)
            loss = self.objective(message.labels, y_pred, message.sample_weight, True)
            reg = regularization(self.segment)
            total = loss if reg is None else loss + reg
            if piece:  # this micro-batch's share of the step's loss
                fraction = share(message, loss.dtype)
                loss, total = loss * fraction, total * tf.cast(fraction, total.dtype)
            if scale is not None:  # mixed float16: the server's own loss scale
                total = total * tf.cast(scale, total.dtype)
        grads = tape.gradient(total, cut + variables)
        cut_grads, var_grads = _cut_gradients(grads, cut), grads[len(cut) :]
        if piece:  # one update per step, with its last micro-batch
            self.gradient_sums().add(
                var_grads,
                last_piece(message),
                lambda sums: apply_gradients(self.optimizer, sums, variables),
            )
            return self._reply(message, Kind.GRADIENTS, cut_grads, loss=loss)
        if scale is None:
            apply_gradients(self.optimizer, var_grads, variables)
            return self._reply(message, Kind.GRADIENTS, cut_grads, loss=loss)
        # Mixed float16: one overflow anywhere skips the whole step, and the
        # client gets the true gradients, unscaled (zeros when skipped).
        finite = all_finite(cut_grads + var_grads)
        apply_gradients(self.optimizer, skip_unless(finite, var_grads), variables)
        cut_grads = unscale(cut_grads, scale, finite)
        return self._reply(message, Kind.GRADIENTS, cut_grads, loss=loss)

    def _check_piece(self, scale) -> None:
        """Refuses a micro-batch this server cannot weigh exactly."""
        if scale is not None:
            raise ValueError(
                "micro-batched steps (config.train.microbatches > 1) do not "
                "run with a loss-scaled (mixed float16) server"
            )
        loss_fn = getattr(self.objective, "loss", None)
        reduction = getattr(loss_fn, "reduction", "sum_over_batch_size")
        if reduction not in ("sum_over_batch_size", "auto"):
            raise ValueError(
                "micro-batches share a batch's mean loss by their rows; "
                f"loss reduction {reduction!r} is not supported"
            )

    def gradient_sums(self) -> GradientSums:
        """The running sums of a micro-batched step, made at the first call:
        call it before compiling steps that take micro-batches (a compiled
        function makes variables only at its first trace)."""
        if self._sums is None:
            self._sums = GradientSums(self.trainable_variables)
        return self._sums

    def _train_distributed(self, message):
        """The vanilla step with the batch split over the strategy's replicas."""
        if is_piece(message):
            raise ValueError(
                "micro-batched steps (config.train.microbatches > 1) do not "
                "run on a distributed server (config.server.strategy)"
            )
        strategy = self.strategy
        cut = list(message.tensors)
        batch = tf.shape(cut[0])[0]
        weights = message.sample_weight
        if weights is None:  # ones: the loss is then exactly the unweighted one
            weights = tf.ones([batch], tf.float32)
        weights = tf.cast(weights, tf.float32)
        values = split_batch(strategy, [*cut, message.labels, weights])
        scale = loss_scale(self.optimizer)
        cut_grads, y_pred, loss, finite = strategy.run(
            lambda v: self._replica_step(v, len(cut), batch, scale), args=(values,)
        )
        grads = [gather(strategy, g, batch) for g in cut_grads]
        if scale is not None:
            finite = strategy.experimental_local_results(finite)[0]
            grads = unscale(grads, scale, finite)
        y_pred = tf.nest.map_structure(lambda t: gather(strategy, t, batch), y_pred)
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        self.objective.track(
            message.labels, y_pred, loss, message.sample_weight, training=True
        )
        return self._reply(message, Kind.GRADIENTS, grads, loss=loss)

    def _replica_step(self, values, count, global_batch, scale):
        """One replica's part of `_train_distributed`: its slice's loss as a
        share of the global batch's mean; the optimizer sums the replicas'
        gradients."""
        pieces, (y, weights, real) = list(values[:count]), values[count:]
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(pieces)
            y_pred = self.segment(pieces[0] if count == 1 else pieces, training=True)
            loss = tf.nn.compute_average_loss(
                self.objective.per_example_loss(y, y_pred),
                sample_weight=weights * real,
                global_batch_size=global_batch,
            )
            total = loss + _regularization_share(self.segment, real, global_batch)
            if scale is not None:  # mixed float16: the server's loss scale
                total = total * tf.cast(scale, total.dtype)
        grads = tape.gradient(total, pieces + variables)
        cut_grads, var_grads = _cut_gradients(grads[:count], pieces), grads[count:]
        finite = tf.constant(True)
        if scale is not None:  # one overflow on any replica skips every replica
            finite = _finite_everywhere(cut_grads + var_grads)
            var_grads = skip_unless(finite, var_grads)
        apply_gradients(self.optimizer, var_grads, variables)
        return cut_grads, y_pred, loss, finite

    def _infer_distributed(self, inputs):
        cut = tf.nest.flatten(inputs)
        batch = tf.shape(cut[0])[0]

        def forward(values):
            pieces = values[:-1]  # the last one marks padding rows
            outputs = self.segment(
                pieces[0] if len(pieces) == 1 else pieces, training=False
            )
            return tf.nest.flatten(outputs)

        outputs = self.strategy.run(forward, args=(split_batch(self.strategy, cut),))
        return [gather(self.strategy, t, batch) for t in outputs]

    def _train_ushaped(self, message):
        """The U-shaped step as a generator: it yields the outputs, then
        (sent the OUTPUT_GRADIENTS message) the cut tensors' gradients."""
        cut, inputs = self._inputs(message)
        tape, outputs, reg = self._ushaped_forward(cut, inputs)
        answer = yield self._reply(message, Kind.SERVER_OUTPUT, outputs)
        grads = self._ushaped_backward(tape, cut, outputs, reg, list(answer.tensors))
        yield self._reply(message, Kind.GRADIENTS, grads)

    def _ushaped_forward(self, cut, inputs):
        with tf.GradientTape() as tape:
            tape.watch(cut)
            outputs = [
                tf.cast(o, wire_dtype(o.dtype))  # 16-bit outputs cross in float32
                for o in tf.nest.flatten(self.segment(inputs, training=True))
            ]
            reg = regularization(self.segment)
        return tape, outputs, reg

    def _ushaped_backward(self, tape, cut, outputs, reg, seeds) -> list:
        variables = self.trainable_variables
        targets, seeds = list(outputs), list(seeds)
        if reg is not None:
            targets.append(reg)
            seeds.append(tf.ones_like(reg))
        grads = tape.gradient(targets, cut + variables, output_gradients=seeds)
        apply_gradients(self.optimizer, grads[len(cut) :], variables)
        return _cut_gradients(grads, cut)

    # ------------------------------------- U-shaped steps over a network
    def compile_paused_steps(self, run_eagerly: bool = False) -> None:
        """A host calls this: each U-shaped step then runs as one compiled
        graph in a thread of its own, paused between its TRAIN and its
        OUTPUT_GRADIENTS message (`PausedStep`), so that it computes what the
        fused in-process step computes. No effect on a vanilla server."""
        if not self.holds_labels:
            self._paused_fn = compiled(self._paused_graph, run_eagerly)

    def _paused_graph(self, client, cut):
        inputs = cut[0] if len(cut) == 1 else cut
        tape, outputs, reg = self._ushaped_forward(cut, inputs)
        seeds = tf.py_function(
            lambda k, *o: self._open_steps[int(k)].pause(list(o)),
            [client, *outputs],
            [o.dtype for o in outputs],
        )
        seeds = [tf.ensure_shape(s, o.shape) for s, o in zip(seeds, outputs)]
        # Nothing of the update (not even the optimizer's step count) may run
        # before the seeds came: a cancelled step changes no variable.
        with tf.control_dependencies(seeds):
            return self._ushaped_backward(tape, cut, outputs, reg, seeds)

    def _start_paused(self, message):
        k = message.client_id
        args = (tf.constant(k, tf.int64), list(message.tensors))
        step = self._open_steps[k] = PausedStep(self._paused_fn, args)
        try:
            outputs = step.start()
        except BaseException:  # no free thread, or the forward pass failed
            del self._open_steps[k]
            raise
        return self._reply(message, Kind.SERVER_OUTPUT, outputs)

    def _cancel(self, client_id: int) -> None:
        step = self._open_steps.pop(client_id, None)
        if isinstance(step, PausedStep):
            step.cancel()

    def rolled_back(self) -> None:
        """A host went back to its last commit: open steps end, not applied,
        and so do the partial sums of a micro-batched step."""
        for k in list(self._open_steps):
            self._cancel(k)
        if self._sums is not None:
            self._sums.reset()

    def _infer(self, message):
        _, inputs = self._inputs(message)
        if self.strategy is not None:
            outputs = self._infer_distributed(inputs)
            outputs = outputs[0] if len(outputs) == 1 else outputs
        else:
            outputs = self.segment(inputs, training=False)
        outputs = tf.nest.map_structure(
            lambda o: tf.cast(o, wire_dtype(o.dtype)), outputs
        )
        if message.kind == Kind.EVALUATE and self.holds_labels:
            loss = self.objective(message.labels, outputs, message.sample_weight, False)
            return self._reply(message, Kind.ACK, (), loss=loss)
        return self._reply(message, Kind.SERVER_OUTPUT, tf.nest.flatten(outputs))

    @staticmethod
    def _reply(message, kind, tensors, loss=None):
        return message.answer(kind, tensors, loss)


def _regularization_share(segment, real, global_batch):
    """This replica's share of the segment's regularization: the fraction of
    the global batch it holds (`real` marks its own rows). Weight penalties
    then add up to one copy over the replicas, and activity penalties, which
    Keras divides by the local batch, to the one-device value even when the
    slices differ in size."""
    reg = regularization(segment)
    if reg is None:
        return 0.0
    share = tf.reduce_sum(real) / tf.cast(global_batch, tf.float32)
    return reg * tf.cast(share, reg.dtype)


def _finite_everywhere(gradients):
    """True on every replica when no replica's `gradients` overflowed."""
    local = tf.cast(all_finite(gradients), tf.float32)
    context = tf.distribute.get_replica_context()
    return context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - local) == 0


def _cut_gradients(grads, cut) -> list:
    """The cut tensors' gradients; zeros for a tensor the segment does not use."""
    return [tf.zeros_like(c) if g is None else g for g, c in zip(grads, cut)]
