"""A client keeps calling an unreachable host with exponential backoff, then
gives up with the call's last status."""

import socket
from unittest import mock

import grpc

from splitkeras.transport import grpc_client
from splitkeras.transport.grpc_client import Connection, RemoteError
from splitkeras.transport.proto import wire_pb2
from tests import base


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RetriesTest(base.TestCase):
    def test_an_unreachable_host_is_retried_with_exponential_backoff(self):
        pauses = []
        clock = [0.0]

        def sleep(seconds):  # no real waiting: the clock jumps instead
            pauses.append(seconds)
            clock[0] += seconds

        connection = Connection(
            f"127.0.0.1:{_closed_port()}", 1, retry_seconds=60.0, timeout=5
        )
        self.addCleanup(connection.close)
        # The module's clock only: gRPC's own deadlines keep real time.
        fake_time = mock.Mock(sleep=sleep, monotonic=lambda: clock[0])
        with (
            mock.patch.object(grpc_client, "time", fake_time),
            self.assertRaises(RemoteError) as raised,
        ):
            connection.call(
                "Join", wire_pb2.JoinRequest(client_id=1), wire_pb2.JoinReply
            )
        self.assertEqual(raised.exception.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(connection.retries, len(pauses))
        # Each pause is its delay times a jitter in [0.5, 1.5); the delay
        # starts at 0.05 s and doubles up to 5 s.
        delays = [min(0.05 * 2**i, 5.0) for i in range(len(pauses))]
        for i, (pause, delay) in enumerate(zip(pauses, delays)):
            self.assertGreaterEqual(pause, 0.5 * delay, i)
            self.assertLess(pause, 1.5 * delay, i)
        # Given up once 60 s had passed: after the delays reached 5 s.
        self.assertGreaterEqual(sum(pauses), 60.0 - 1.5 * 5.0)
        self.assertEqual(delays[-1], 5.0)
