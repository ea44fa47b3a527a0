"""The in-process transport: a real transport without a network.

It encodes every tensor with the codec, counts the bytes that would travel
in each direction for each client (every wire part of the codec, plus
labels, sample weights, losses and ids as they are, and sealed states as
their bytes), decodes on arrival and hands the message to the receiving
party. Step messages go through TensorFlow ops, so a step that goes through
it can be compiled into one graph with the parties' computations;
orchestration messages (turns, weights, averages) go through it eagerly,
between steps.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras.protocol import DATA_KINDS, Kind, Message, NotYet, Status
from splitkeras.transport.codec import get_codec
from splitkeras.transport.counters import CATEGORIES, ByteCounters, category

__all__ = ["LocalTransport", "OutOfOrder"]


class OutOfOrder(RuntimeError):
    """In one process a party asked to wait for another: a schedule bug."""


class LocalTransport:
    """Carries messages between clients and one in-process party.

    Args:
      server: the party that answers requests (has `handle(message)`).
      num_clients: how many clients talk through this transport.
      codec_up: codec (name or `Codec`) for tensors going to the server.
      codec_down: codec for tensors coming back.
      weight_codec: codec of weights, averages and gradients exchanged
        between steps (WEIGHTS, UPDATE).
      counters: the `ByteCounters` to count into (several transports may
        share one); None: counters of this transport's own for `categories`'
        kinds.
      categories: {Kind: category} overrides of what a kind's bytes count as
        (`splitkeras.transport.counters.CATEGORIES`), e.g. weights counted as
        "data" where they are all a baseline sends.
    """

    def __init__(
        self,
        server,
        num_clients=1,
        codec_up="float32",
        codec_down="float32",
        weight_codec="float32",
        counters: ByteCounters | None = None,
        categories: dict | None = None,
    ):
        self.server = server
        self.codec_up = get_codec(codec_up)
        self.codec_down = get_codec(codec_down)
        self.weight_codec = get_codec(weight_codec)
        self.categories = dict(categories or {})
        if counters is None:
            counters = ByteCounters.for_categories(["data"], num_clients)
        self.counters = counters
        self.num_clients = num_clients

    @property
    def bytes_up(self) -> list:
        return [self.counters.of(k)["bytes_up"] for k in range(self.num_clients)]

    @property
    def bytes_down(self) -> list:
        return [self.counters.of(k)["bytes_down"] for k in range(self.num_clients)]

    def request(self, message: Message) -> Message:
        """Sends `message` to the server and returns its reply.

        Raises:
          OutOfOrder: the receiver cannot answer before other parties have
            sent theirs, which in one process cannot happen in time.
        """
        try:
            reply = self.server.handle(self.carry_up(message))
        except NotYet as e:
            raise OutOfOrder(
                f"{message.kind.name} of client {message.client_id} (step "
                f"{message.step}, round {message.round}) would have to wait for "
                f"other parties ({e}); in one process the schedule must run its "
                "parties in an order in which nobody waits"
            ) from None
        return self.carry_down(reply)

    # A step whose reply is awaited later (micro-batches, asynchronous
    # steps): in one process the reply is there at once, and the ticket is
    # the reply itself: (loss, *tensors).
    def send(self, message: Message) -> tuple:
        """Sends a step message; returns the ticket `receive` takes."""
        reply = self.request(message)
        loss = tf.constant(float("nan")) if reply.loss is None else reply.loss
        return (tf.cast(loss, tf.float32), *reply.tensors)

    def unsent(self, message: Message) -> tuple:
        """The ticket of a message not sent (an empty micro-batch)."""
        return (tf.constant(0.0), *[tf.zeros_like(t) for t in message.tensors])

    def receive(self, ticket, kind=Kind.TRAIN) -> Message:
        """The reply a ticket stands for (a step's gradients)."""
        loss, *tensors = ticket
        return Message(Kind.GRADIENTS, 0, tensors=tuple(tensors), loss=loss)

    def poll(self, message: Message) -> Message:
        """`request`, for a message the answer to which may be "wait".

        In one process nobody else can move while a party waits, so a WAIT
        answer means the schedule ran its parties out of order.

        Raises:
          OutOfOrder: the receiver answered WAIT.
        """
        reply = self.request(message)
        if reply.status == Status.WAIT:
            raise OutOfOrder(
                f"{message.kind.name} of client {message.client_id} (round "
                f"{message.round}) would have to wait for another party; in one "
                "process the schedule must run its parties in an order in which "
                "nobody waits"
            )
        return reply

    def carry_up(self, message: Message) -> Message:
        """Carries one message from its client towards the server (as arrived)."""
        return self._carry(message, self.codec_up, up=True)

    def carry_down(self, message: Message) -> Message:
        """Carries one message from the server to its client (as arrived)."""
        return self._carry(message, self.codec_down, up=False)

    def _carry(self, message, codec, up):
        if not 0 <= message.client_id < self.num_clients:
            raise ValueError(
                f"client id {message.client_id} is not served by this transport "
                f"(it serves clients 0..{self.num_clients - 1})"
            )
        kind = category(message.kind, self.categories)
        name = CATEGORIES[kind][0 if up else 1]
        if message.kind not in DATA_KINDS:
            codec = self.weight_codec
        tensors = [tf.convert_to_tensor(t) for t in message.tensors]
        wire = [codec.encode(t) for t in tensors]
        extras = message.payload()[len(message.tensors) :]
        sent = [p for parts in wire for p in parts]
        sent += [tf.convert_to_tensor(t) for t in extras]
        nbytes = _nbytes(sent)
        if message.state:
            nbytes += len(message.state)
        if tensors or extras or message.state:
            self.counters.add(name, message.client_id, nbytes)
        arrived = tuple(_decode(codec, parts, t) for parts, t in zip(wire, tensors))
        return message.replace(tensors=arrived)

    def counters_of(self, client_id: int) -> dict:
        """One client's byte counters (variables), for its checkpoint."""
        return self.counters.of(client_id)

    def byte_counts(self) -> dict:
        """Bytes sent so far: {'bytes_up': [per client], 'bytes_down': [...], ...}."""
        return self.counters.as_dict()


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
