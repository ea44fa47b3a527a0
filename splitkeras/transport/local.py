"""The in-process transport: a real transport without a network.

It encodes every tensor with the codec, counts the bytes that would travel in
each direction for each client (every wire part of the codec, plus labels,
sample weights, losses and ids as they are), decodes on arrival and hands the
message to the server. Everything is TensorFlow ops, so a step that goes
through it can be compiled into one graph with the parties' computations.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras.protocol import Message
from splitkeras.transport.codec import get_codec

__all__ = ["LocalTransport"]


class LocalTransport:
    """Carries messages between clients and one in-process server.

    Args:
      server: the party that answers requests (has `handle(message)`).
      num_clients: how many clients talk through this transport.
      codec_up: codec (name or `Codec`) for tensors going to the server.
      codec_down: codec for tensors coming back.
    """

    def __init__(self, server, num_clients=1, codec_up="float32", codec_down="float32"):
        self.server = server
        self.codec_up = get_codec(codec_up)
        self.codec_down = get_codec(codec_down)
        self.bytes_up = [self._counter(f"bytes_up_{k}") for k in range(num_clients)]
        self.bytes_down = [self._counter(f"bytes_down_{k}") for k in range(num_clients)]

    @staticmethod
    def _counter(name):
        return tf.Variable(0, dtype=tf.int64, trainable=False, name=name)

    def request(self, message: Message) -> Message:
        """Sends `message` to the server and returns its reply."""
        return self.carry_down(self.server.handle(self.carry_up(message)))

    def carry_up(self, message: Message) -> Message:
        """Carries one message from its client towards the server (as arrived)."""
        return self._carry(message, self.codec_up, self.bytes_up)

    def carry_down(self, message: Message) -> Message:
        """Carries one message from the server to its client (as arrived)."""
        return self._carry(message, self.codec_down, self.bytes_down)

    def _carry(self, message, codec, counters):
        if not 0 <= message.client_id < len(counters):
            raise ValueError(
                f"client id {message.client_id} is not served by this transport "
                f"(it serves clients 0..{len(counters) - 1})"
            )
        tensors = [tf.convert_to_tensor(t) for t in message.tensors]
        wire = [codec.encode(t) for t in tensors]
        extras = message.payload()[len(message.tensors) :]
        sent = [p for parts in wire for p in parts]
        sent += [tf.convert_to_tensor(t) for t in extras]
        counters[message.client_id].assign_add(_nbytes(sent))
        arrived = tuple(_decode(codec, parts, t) for parts, t in zip(wire, tensors))
        return message.replace(tensors=arrived)

    def counters_of(self, client_id: int) -> dict:
        """One client's byte counters (variables), for its checkpoint."""
        return {
            "bytes_up": self.bytes_up[client_id],
            "bytes_down": self.bytes_down[client_id],
        }

    def byte_counts(self) -> dict:
        """Bytes sent so far: {'bytes_up': [per client], 'bytes_down': [...]}."""
        return {
            "bytes_up": [int(v.numpy()) for v in self.bytes_up],
            "bytes_down": [int(v.numpy()) for v in self.bytes_down],
        }


def _decode(codec, parts, sent):
    """`sent` as it arrives, with its static shape (a dynamic batch stays None)."""
    tensor = codec.decode(parts, sent.dtype, tf.shape(sent))
    tensor.set_shape(sent.shape)
    return tensor


def _nbytes(tensors) -> tf.Tensor:
    total = tf.constant(0, tf.int64)
    for t in tensors:
        total += tf.size(t, out_type=tf.int64) * t.dtype.size
    return total
