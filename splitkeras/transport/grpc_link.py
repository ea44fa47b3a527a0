"""A Keras party's link over gRPC: `GrpcLink.request(message)`.

`GrpcLink` gives a `Client` (or a relay) the same `request(message)` and
`poll(message)` as the in-process transport, so every client program runs
unchanged. A step's message goes through the codec as TensorFlow ops inside
the compiled step, and the network round trip (over a
`splitkeras.transport.grpc_client.Connection`) is a `tf.py_function` between
the forward and the backward pass (the client's tape stays open across it,
so nothing is recomputed). Orchestration messages (BEGIN, END, weights,
averages, gradients of large-batch SGD) go eagerly, between steps, their
tensors through the weight codec, and every tensor that comes back is
checked as the host checks what arrives.
"""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf

from splitkeras.protocol import DATA_KINDS, Kind, Message
from splitkeras.transport import wire
from splitkeras.transport.codec import get_codec
from splitkeras.transport.grpc_client import Connection, poll
from splitkeras.transport.proto import wire_pb2

__all__ = ["GrpcLink"]


class GrpcLink:
    """`request(message)` over gRPC, for `Client.train_step` and friends.

    Args:
      connection: the client's `Connection`.
      cut_dtypes: dtypes of the client's cut tensors (graph order).
      cut_shapes: their static shapes (batch None), for the gradients.
      output_dtypes: dtypes of the server segment's outputs.
      output_shapes: their static shapes if known (U-shaped: the tail's
        inputs), else None.
      ushaped: the client keeps labels and loss (the server has none).
      codec_up / codec_down: the codecs of activations and of gradients.
      to: the receiving party's name on its host ("" = the host's first).
      weight_codec: the codec of weights, averages and gradients between
        steps.
      weight_specs: [(dtype, shape)] of the weights a FETCH brings back.
      poll_seconds: pause between two asks after a WAIT answer.
    """

    def __init__(
        self,
        connection: Connection,
        cut_dtypes=(),
        cut_shapes=(),
        output_dtypes=(),
        output_shapes=None,
        ushaped: bool = False,
        codec_up="float32",
        codec_down="float32",
        to: str = "",
        weight_codec="float32",
        weight_specs=None,
        poll_seconds: float = 0.05,
    ):
        self.connection = connection
        self.to = to
        self.weight_codec = get_codec(weight_codec)
        self.poll_seconds = poll_seconds
        self.bind(cut_dtypes, cut_shapes, output_dtypes, output_shapes, ushaped)
        self.weight_specs = weight_specs
        self.codec_up = get_codec(codec_up)
        self.codec_down = get_codec(codec_down)
        self.error = None  # the last exception raised inside the round trip
        self._pending = {}  # ticket -> (call, step, offset) sent, not received
        self._tokens = 0
        self._lock = threading.Lock()

    def bind(
        self, cut_dtypes, cut_shapes, output_dtypes, output_shapes=None, ushaped=False
    ) -> None:
        """What this link carries: the sender's cut tensors and the receiver's
        outputs (set before the first step is compiled)."""
        self.cut = list(zip([tf.as_dtype(d) for d in cut_dtypes], cut_shapes))
        output_shapes = output_shapes or [None] * len(output_dtypes)
        self.outputs = list(zip([tf.as_dtype(d) for d in output_dtypes], output_shapes))
        self.ushaped = ushaped

    def _reply(self, kind):
        """(reply kind, [(dtype, static shape)]) expected for a request kind."""
        if kind == Kind.TRAIN:
            if self.ushaped:
                return Kind.SERVER_OUTPUT, self.outputs
            return Kind.GRADIENTS, self.cut
        if kind == Kind.OUTPUT_GRADIENTS:
            return Kind.GRADIENTS, self.cut
        if kind == Kind.EVALUATE and not self.ushaped:
            return Kind.ACK, []
        if kind in (Kind.EVALUATE, Kind.PREDICT):
            return Kind.SERVER_OUTPUT, self.outputs
        raise ValueError(f"a client does not send {Kind(kind).name} messages")

    def poll(self, message: Message) -> Message:
        """`request`, asked again while the answer is WAIT."""
        return poll(self.request, message, self.poll_seconds)

    def request(self, message: Message) -> Message:
        """Sends `message` to the party and returns its reply."""
        kind = Kind(message.kind)
        if kind not in DATA_KINDS:
            return self._control(message)
        layout, inputs = self._layout(message)
        outputs = tf.py_function(
            lambda *args: self._round_trip(layout, *args),
            inputs,
            self._out_types(layout),
        )
        return self._decoded(message, layout, outputs)

    # A step whose reply is awaited later (micro-batches, asynchronous steps):
    # the call goes out at once, and its ticket is a number standing for it.
    def send(self, message: Message) -> tuple:
        """Sends a step message without waiting; returns the ticket
        `receive` takes."""
        layout, inputs = self._layout(message)
        token = tf.py_function(
            lambda *args: self._start(layout, *args), inputs, tf.int64
        )
        token.set_shape([])
        return (token,)

    def unsent(self, message: Message) -> tuple:
        """The ticket of a message not sent (an empty micro-batch)."""
        return (tf.constant(-1, tf.int64),)

    def receive(self, ticket, kind=Kind.TRAIN) -> Message:
        """Waits for the reply of the message `ticket` stands for."""
        layout = (kind, *self._reply(kind))
        outputs = tf.py_function(
            lambda token: self._finish(layout, token),
            [ticket[0]],
            self._out_types(layout),
        )
        return self._decoded(Message(kind, 0), layout, outputs)

    def drop_pending(self) -> None:
        """Cancels every call sent and not yet received (a turn begun
        again): the host applies none of them."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for call, _, _ in pending.values():
            call.cancel()

    def _layout(self, message):
        """(layout, py_function inputs) of a step message: the codec's wire
        parts of its tensors, their shapes, labels, weights and ids."""
        kind = Kind(message.kind)
        reply_kind, specs = self._reply(kind)
        tensors = [tf.convert_to_tensor(t) for t in message.tensors]
        parts = [self.codec_up.encode(t) for t in tensors]
        extras = {
            name: tf.convert_to_tensor(value)
            for name, value in (
                ("labels", message.labels),
                ("sample_weight", message.sample_weight),
                ("ids", message.ids),
            )
            if value is not None
        }
        layout = (
            kind,
            reply_kind,
            specs,
            [(t.dtype, len(p)) for t, p in zip(tensors, parts)],
            list(extras),
        )
        inputs = (
            [
                tf.cast(message.step, tf.int64),
                tf.cast(message.offset, tf.int64),
                tf.cast(message.rows, tf.int64),
            ]
            + [tf.shape(t, out_type=tf.int64) for t in tensors]
            + [p for ps in parts for p in ps]
            + list(extras.values())
        )
        return layout, inputs

    def _out_types(self, layout) -> list:
        out_types = [tf.float32]
        for dtype, _ in layout[2]:
            out_types += list(self.codec_down.wire_dtypes(dtype)) + [tf.int64]
        return out_types

    def _decoded(self, message, layout, outputs) -> Message:
        """The reply `Message` of a round trip's outputs, decoded."""
        reply_kind, specs = layout[1], layout[2]
        loss, outputs = outputs[0], list(outputs[1:])
        loss.set_shape([])
        decoded = []
        for dtype, shape in specs:
            n = len(self.codec_down.wire_dtypes(dtype))
            wire_parts, size = outputs[:n], outputs[n]
            outputs = outputs[n + 1 :]
            tensor = self.codec_down.decode(tuple(wire_parts), dtype, size)
            if shape is not None:
                tensor = tf.ensure_shape(tensor, shape)
            decoded.append(tensor)
        return Message(
            kind=reply_kind,
            client_id=message.client_id,
            step=message.step,
            tensors=tuple(decoded),
            loss=None if reply_kind == Kind.SERVER_OUTPUT else loss,
        )

    def _envelope(self, layout, step, offset, rows, *args):
        """The envelope (and its out-of-line payloads) of a step message."""
        kind, _, _, tensor_layout, extra_names = layout
        args = list(args)
        shapes, args = args[: len(tensor_layout)], args[len(tensor_layout) :]
        envelope = wire_pb2.Envelope(
            kind=int(kind),
            client_id=self.connection.client_id,
            step=int(step),
            to=self.to,
            offset=int(offset),
            rows=int(rows),
        )
        payloads = []  # array bytes travel after the envelope (wire.frame)
        for (dtype, n), shape in zip(tensor_layout, shapes):
            wire.encoded_from_parts(
                self.codec_up,
                dtype,
                shape.numpy(),
                args[:n],
                envelope.tensors.add(),
                payloads,
            )
            args = args[n:]
        for name, value in zip(extra_names, args):
            wire.fill_array(getattr(envelope, name), value, payloads)
        return envelope, payloads

    def _round_trip(self, layout, *args):
        """The network part (eager, numpy): build, send, check the reply."""
        try:
            envelope, payloads = self._envelope(layout, *args)
            reply, arrived = self.connection.exchange(envelope, payloads)
            sent = (envelope.step, envelope.offset)
            return self._check_reply(reply, arrived, sent, layout[1], layout[2])
        except Exception as e:
            self.error = e
            raise

    def _start(self, layout, *args):
        try:
            envelope, payloads = self._envelope(layout, *args)
            call = self.connection.start_exchange(envelope, payloads)
            # A step's micro-batches may go out from several threads at once.
            with self._lock:
                self._tokens += 1
                token = self._tokens
                self._pending[token] = (call, envelope.step, envelope.offset)
            return np.int64(token)
        except Exception as e:
            self.error = e
            raise

    def _finish(self, layout, token):
        try:
            with self._lock:
                call, step, offset = self._pending.pop(int(token))
            reply, arrived = call.result()
            return self._check_reply(
                reply, arrived, (step, offset), layout[1], layout[2]
            )
        except Exception as e:
            self.error = e
            raise

    def _check_reply(self, reply, arrived, sent, reply_kind, specs):
        """The round trip's outputs from `reply` to the message `sent` (its
        step and row offset), checked."""
        step, offset = sent
        if reply.kind != reply_kind or reply.step != step:
            raise wire.WireError(
                f"expected a {reply_kind.name} reply for step {step}, got "
                f"{wire.kind_name(reply.kind)} for step {reply.step}"
            )
        if reply.offset != offset:
            raise wire.WireError(
                f"expected the reply to the micro-batch at row {offset} of "
                f"step {step}, got row {reply.offset}"
            )
        if len(reply.tensors) != len(specs):
            raise wire.WireError(
                f"{reply_kind.name} reply has {len(reply.tensors)} tensors, "
                f"expected {len(specs)}"
            )
        loss = np.float32(np.nan)
        if reply.HasField("loss"):
            loss = np.float32(arrived.array(reply.loss, "loss", "loss").reshape(()))
        out = [loss]
        for i, (encoded, (dtype, shape)) in enumerate(zip(reply.tensors, specs)):
            rank = len(encoded.shape) if shape is None else len(shape)
            expected = [None] * rank if shape is None else list(shape)
            out += wire.check_encoded(
                encoded,
                self.codec_down,
                dtype,
                expected,
                f"reply tensor {i}",
                arrived,
                i,
            )
            out.append(np.asarray(encoded.shape, np.int64))
        return out

    def _control(self, message: Message) -> Message:
        """An orchestration message, eagerly; weights through the weight codec."""
        envelope = wire.control_envelope(message, self.to)
        payloads = []
        for t in message.tensors:
            wire.encode_tensor(self.weight_codec, t, envelope.tensors.add(), payloads)
        try:
            reply, arrived = self.connection.exchange(envelope, payloads)
        except Exception as e:
            self.error = e
            raise
        tensors = ()
        if len(reply.tensors):
            specs = self.weight_specs
            if specs is None or len(reply.tensors) != len(specs):
                raise wire.WireError(
                    f"{wire.kind_name(reply.kind)} reply carries "
                    f"{len(reply.tensors)} tensors, expected "
                    f"{0 if specs is None else len(specs)}"
                )
            tensors = tuple(
                self._weight(encoded, spec, arrived, i)
                for i, (encoded, spec) in enumerate(zip(reply.tensors, specs))
            )
        return wire.control_message(reply, tensors=tensors)

    def _weight(self, encoded, spec, arrived, index):
        dtype, shape = spec
        what = f"reply weight {index}"
        parts = wire.check_encoded(
            encoded, self.weight_codec, dtype, list(shape), what, arrived, index
        )
        return wire.decode_tensor(self.weight_codec, encoded, parts, what)
