"""The client side of the gRPC transport.

`Connection` is one client's channel to a host: authentication metadata,
deadlines, retries with exponential backoff, and the bytes it actually sent
and received (no TensorFlow: the edge client uses it too). `ControlLink`
carries orchestration messages without tensors (turns, handoffs, reports)
over it; `GrpcLink` (`splitkeras.transport.grpc_link`) carries a Keras
client's steps and weights.

Retried calls repeat the message's step id, and the server applies each step
exactly once (it answers a repeated step from its cache). When the server has
rolled back (it restarted from a checkpoint, or this client's turn restarted)
it refuses the step with FAILED_PRECONDITION and the call raises
`TurnRestarted`: the caller begins the turn again.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import grpc

from splitkeras.protocol import Message, Status
from splitkeras.transport import wire

log = logging.getLogger("splitkeras")

__all__ = [
    "Connection",
    "ControlLink",
    "PendingExchange",
    "RemoteError",
    "TurnRestarted",
]

SERVICE = "/splitkeras.wire.SplitServer/"
METHODS = ("Join", "Exchange")
# gRPC frames every message with 5 bytes (compressed flag + length).
FRAME_BYTES = 5
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteError(RuntimeError):
    """The server refused a call; `code` is its gRPC status code."""

    def __init__(self, method, code, details):
        super().__init__(f"{method} refused by the server: {code.name}: {details}")
        self.code = code
        self.details = details


class TurnRestarted(RemoteError):
    """The server no longer expects this step: begin the turn again."""


def channel_options(max_message_bytes: int) -> list:
    """gRPC channel/server options: the message size limit both ways."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
    ]


class Connection:
    """One client's channel to the server.

    Args:
      target: "host:port".
      client_id: this client's id (sent as metadata with every call).
      token: this client's token, or None when the server needs none.
      credentials: `grpc.ChannelCredentials` for TLS, or None (plaintext).
      max_message_bytes: the largest message sent or received.
      timeout: the deadline of each call, in seconds.
      retry_seconds: how long to keep retrying an unavailable server.
    """

    def __init__(
        self,
        target: str,
        client_id: int,
        token: str | None = None,
        credentials=None,
        max_message_bytes: int = 64 << 20,
        timeout: float = 60.0,
        retry_seconds: float = 300.0,
    ):
        options = channel_options(max_message_bytes)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self._stubs = {m: self.channel.unary_unary(SERVICE + m) for m in METHODS}
        self.client_id = client_id
        self.metadata = (
            ("x-splitkeras-client", str(client_id)),
            ("x-splitkeras-token", token or ""),
        )
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.bytes_sent = 0
        self.bytes_received = 0
        self.retries = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, target: str, client_id: int, settings, token=None, credentials=None
    ) -> Connection:
        """A connection with a run's `config.grpc` limit, deadline and retries."""
        return cls(
            target,
            client_id,
            token=token,
            credentials=credentials,
            max_message_bytes=settings.max_message_mb << 20,
            timeout=settings.timeout_seconds,
            retry_seconds=settings.retry_seconds,
        )

    def call(self, method: str, request, reply_type, timeout: float | None = None):
        """Calls `method`, retrying while the server is unavailable.

        Raises:
          TurnRestarted: FAILED_PRECONDITION (the server rolled back).
          RemoteError: any other refusal, or no answer within retry_seconds.
        """
        reply = self._send(method, request.SerializeToString(), timeout)
        return wire.parse(reply_type, reply, f"{method} reply")

    def exchange(self, envelope, payloads):
        """Sends `envelope` framed with `payloads`; returns (reply, Payloads)."""
        reply = self._send("Exchange", wire.frame(envelope, payloads))
        return wire.open_body(reply, "Exchange reply")

    def start_exchange(self, envelope, payloads) -> PendingExchange:
        """Sends `envelope` framed with `payloads` without waiting for the
        reply (several calls may be in flight); `.result()` waits for it."""
        data = wire.frame(envelope, payloads)
        with self._lock:
            self.bytes_sent += len(data) + FRAME_BYTES
        future = self._stubs["Exchange"].future(
            data, timeout=self.timeout, metadata=self.metadata
        )
        return PendingExchange(self, data, future)

    def _received(self, reply: bytes) -> bytes:
        with self._lock:
            self.bytes_received += len(reply) + FRAME_BYTES
        return reply

    def _send(self, method, data: bytes, timeout=None) -> bytes:
        """The bytes of `method`'s reply to `data`, with retries."""
        give_up = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            with self._lock:
                self.bytes_sent += len(data) + FRAME_BYTES
            try:
                reply = self._stubs[method](
                    data,
                    timeout=timeout or self.timeout,
                    metadata=self.metadata,
                )
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code in _RETRIED and time.monotonic() < give_up:
                    self.retries += 1
                    log.info(
                        "%s: %s (%s); retrying in %.2f s",
                        method,
                        code.name,
                        details,
                        delay,
                    )
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 5.0)
                    continue
                raise refusal(method, code, details) from None
            return self._received(reply)

    def close(self) -> None:
        self.channel.close()


def refusal(method, code, details) -> RemoteError:
    """The exception of a call the server refused."""
    error = (
        TurnRestarted if code == grpc.StatusCode.FAILED_PRECONDITION else RemoteError
    )
    return error(method, code, details)


class PendingExchange:
    """An Exchange call in flight (`Connection.start_exchange`)."""

    def __init__(self, connection: Connection, data: bytes, future):
        self.connection = connection
        self.data = data
        self.future = future

    def result(self):
        """(reply envelope, payloads); an unavailable server or a missed
        deadline is retried as `Connection.exchange` does (the same step id:
        the host answers it once)."""
        try:
            reply = self.connection._received(self.future.result())
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
            if code not in _RETRIED:
                raise refusal("Exchange", code, details) from None
            self.connection.retries += 1
            reply = self.connection._send("Exchange", self.data)
        return wire.open_body(reply, "Exchange reply")

    def cancel(self) -> None:
        self.future.cancel()


class ControlLink:
    """Orchestration messages without tensors to one party, over a `Connection`.

    `request(message)` sends one message and returns the reply; `poll`
    asks again while the answer is WAIT (the host already waits a little
    before it answers so).

    Args:
      connection: the channel to the party's host.
      to: the party's name on that host ("" = the host's first party).
      poll_seconds: pause between two asks after a WAIT.
    """

    def __init__(self, connection: Connection, to: str = "", poll_seconds=0.05):
        self.connection = connection
        self.to = to
        self.poll_seconds = poll_seconds

    def request(self, message: Message) -> Message:
        reply, _ = self.connection.exchange(wire.control_envelope(message, self.to), [])
        return wire.control_message(reply)

    def poll(self, message: Message) -> Message:
        return poll(self.request, message, self.poll_seconds)


def poll(request, message: Message, pause_seconds: float) -> Message:
    """`request(message)`, asked again (after a pause) while the answer is WAIT."""
    while True:
        reply = request(message)
        if reply.status != Status.WAIT:
            return reply
        time.sleep(pause_seconds)
