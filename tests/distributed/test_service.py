"""The generic gRPC host serving a round robin (`GrpcHost` with its `Turns`
coordinator) over real gRPC on 127.0.0.1: authentication, TLS, hostile
input, exactly-once steps and turn timeouts.

Every refused call must leave the server exactly as it was (weights,
optimizer iterations, training metrics, round-robin position), and be
refused with a status code that names the problem (never INTERNAL).
"""

import concurrent.futures
import os
import shutil
import tempfile
import threading
import time
from unittest import mock

import grpc
import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.checkpointing import party_checkpoint
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.host_process import HostProcess
from splitkeras.objective import Objective
from splitkeras.parties.server import Server
from splitkeras.protocol import Kind, Message, Status
from splitkeras.schedules.turn_coordinator import Turns
from splitkeras.transport import tls, wire
from splitkeras.transport.codec import get_codec
from splitkeras.transport.grpc_client import (
    FRAME_BYTES,
    Connection,
    RemoteError,
    TurnRestarted,
    channel_options,
)
from splitkeras.transport.grpc_host import GrpcHost, start_host
from splitkeras.transport.proto import wire_pb2
from tests import base

Code = grpc.StatusCode
TOKENS = {0: "tok0", 1: "tok1"}
BATCH = 4
CLASSES = 3
CUT_SHAPE = (8, 8, 2)  # the client segment's output: conv with 2 filters
CODEC = get_codec("float32")
CALL_TIMEOUT = 5.0
# The codes a malformed Exchange may be refused with.
REFUSALS = {
    Code.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED,
}


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(2, 3, padding="same", name="conv")(x)
    h = keras.layers.Flatten(name="flatten")(h)
    out = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(x, out, name="tiny")


def _ushaped_model():
    """The tiny model with a hidden layer for the server of a U-shaped cut
    ("conv" | flatten, hidden | logits)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(2, 3, padding="same", name="conv")(x)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(6, activation="relu", name="hidden")(h)
    out = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(x, out, name="tiny_u")


def _plain_server(host):
    """`start_host` without its watchdog thread (tests call `tick` themselves)."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=8),
        options=channel_options(64 << 20),
    )
    server.add_generic_rpc_handlers(host.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class _Fixture:
    """A tiny vanilla split: the generic host serving a round robin's server
    and coordinator on 127.0.0.1, two clients."""

    def __init__(
        self,
        turn_timeout=600.0,
        max_message_bytes=64 << 20,
        watchdog=True,
        clock=time.monotonic,
        codec="float32",
        ushaped=False,
    ):
        self.dir = tempfile.mkdtemp(prefix="service-", dir=os.environ.get("TMPDIR"))
        # U-shaped: the server holds flatten and hidden, the client the tail.
        self.segments = (
            cut(_ushaped_model(), ("conv", "hidden"))
            if ushaped
            else cut(_model(), "conv")
        )
        objective = Objective(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            ("accuracy",),
        )
        self.server = Server(
            self.segments.server,
            keras.optimizers.SGD(0.1),
            None if ushaped else objective,
        )
        self.server.build_optimizer()
        self.turns = Turns(
            self.server,
            2,
            epochs=1,
            store_state=True,
            turn_timeout=turn_timeout,
            clock=clock,
        )
        self.host = GrpcHost(
            {"server": self.turns},
            2,
            tokens=dict(TOKENS),
            checkpoint_dir=os.path.join(self.dir, "run", "checkpoints"),
            state={
                "server": party_checkpoint(
                    [self.segments.server], self.server.optimizer
                ),
                "coordinator": tf.train.Checkpoint(**self.turns.trackables()),
            },
            info={"run": "run", "epochs": 1},
            coordinator=self.turns,
            wait_seconds=0.2,
            codec_up=codec,
            codec_down=codec,
        )
        if watchdog:
            self.grpc_server, self.port = start_host(
                self.host, "127.0.0.1:0", max_message_bytes=max_message_bytes
            )
        else:
            self.grpc_server, self.port = _plain_server(self.host)
        self.target = f"127.0.0.1:{self.port}"
        self.connections = []
        self.c0 = self.connect(0, TOKENS[0])
        self.c1 = self.connect(1, TOKENS[1])
        rng = np.random.default_rng(1)
        self.images = rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32)
        self.labels = np.array([0, 1, 2, 1], np.int64)

    def connect(self, client_id, token, credentials=None, target=None):
        connection = Connection(
            target or self.target,
            client_id,
            token=token,
            credentials=credentials,
            timeout=CALL_TIMEOUT,
            retry_seconds=0,
        )
        self.connections.append(connection)
        return connection

    def close(self):
        self.host.closed.set()  # stops start_host's watchdog
        for connection in self.connections:
            connection.close()
        self.grpc_server.stop(grace=None).wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ state
    def snapshot(self):
        """Everything a refused message must leave unchanged."""
        return {
            "weights": [w.copy() for w in self.segments.server.get_weights()],
            "iterations": int(self.server.optimizer.iterations.numpy()),
            "position": self.host.position(),
            "metrics": self.server.objective.result(training=True)
            if self.server.objective is not None
            else None,
        }

    def weights_equal(self, a, b):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    # --------------------------------------------------------- messages
    def cut_tensor(self, images=None):
        return self.segments.client(self.images if images is None else images)

    def envelope(self, step, kind=Kind.TRAIN, client_id=0, images=None, labels=None):
        """A valid TRAIN envelope (labels: these, or the fixture's)."""
        envelope = wire_pb2.Envelope(kind=int(kind), client_id=client_id, step=step)
        envelope.tensors.append(wire.encode_tensor(CODEC, self.cut_tensor(images)))
        y = self.labels if labels is None else labels
        envelope.labels.CopyFrom(wire.to_array(y))
        return envelope

    def next_step(self):
        return self.host.position()[2] + 1

    def control(self, kind, client_id=0, epoch=0, step=0):
        """An orchestration envelope (BEGIN, END) of `client_id`."""
        return wire.control_envelope(
            Message(kind, client_id, step, round=epoch, state=b"sealed")
        )

    def begin(self, connection=None, epoch=0):
        """BEGIN of the connection's turn: the reply (status READY: its turn)."""
        connection = connection or self.c0
        return connection.call(
            "Exchange",
            self.control(Kind.BEGIN, connection.client_id, epoch),
            wire_pb2.Envelope,
        )


def _scalar(value, dtype):
    """A 0-d `Array` of `value`."""
    data = np.asarray(value, dtype).tobytes()
    return wire_pb2.Array(dtype=np.dtype(dtype).name, shape=[], data=data)


def _raw(connection, data, method="Exchange", metadata=None):
    """(status code, reply bytes or details) of one call, no retries."""
    try:
        reply = connection._stubs[method](
            data,
            metadata=connection.metadata if metadata is None else metadata,
            timeout=CALL_TIMEOUT,
        )
    except grpc.RpcError as e:
        return e.code(), e.details()
    return Code.OK, reply


def _refused(test, code, text, call, *args):
    """Asserts `call(*args)` raises RemoteError with `code` and `text` in details."""
    with test.assertRaises(RemoteError) as raised:
        call(*args)
    test.assertEqual(raised.exception.code, code, raised.exception.details)
    test.assertIn(text, raised.exception.details)
    return raised.exception


def _check_gradients_reply(test, reply_bytes, step):
    reply = wire_pb2.Envelope.FromString(reply_bytes)
    test.assertEqual(reply.kind, Kind.GRADIENTS)
    test.assertEqual(reply.step, step)
    test.assertEqual(reply.client_id, 0)
    test.assertLen(reply.tensors, 1)
    encoded = reply.tensors[0]
    test.assertEqual(list(encoded.shape), [BATCH, *CUT_SHAPE])
    parts = wire.check_encoded(
        encoded, CODEC, tf.float32, [BATCH, *CUT_SHAPE], "gradient"
    )
    gradient = wire.decode_tensor(CODEC, encoded, parts, "gradient")
    test.assertEqual(gradient.shape, (BATCH, *CUT_SHAPE))
    test.assertTrue(np.isfinite(wire.from_array(reply.loss, "loss")).all())
    return reply


class FixtureCase(base.TestCase):
    """One `_Fixture` for the class (`fixture()` makes it), and the state it
    started in."""

    @classmethod
    def fixture(cls):
        return _Fixture()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.f = cls.fixture()
        cls.start = cls.f.snapshot()

    @classmethod
    def tearDownClass(cls):
        cls.f.close()
        super().tearDownClass()


class ServiceTest(FixtureCase):
    """One service for the class; every test begins client 0's turn afresh
    (beginning it again rolls the server back to the start of the turn)."""

    @classmethod
    def fixture(cls):
        return _Fixture(max_message_bytes=1 << 20)

    def setUp(self):
        super().setUp()
        reply = self.f.begin()
        self.assertEqual(reply.status, Status.READY)
        self.assertEqual(reply.step, 0)
        now = self.f.snapshot()
        self.assertEqual(now["position"], (0, 0, 0))
        self.assertTrue(self.f.weights_equal(now["weights"], self.start["weights"]))

    def assertUnchanged(self, before, what=""):
        now = self.f.snapshot()
        self.assertTrue(
            self.f.weights_equal(now["weights"], before["weights"]),
            f"weights changed {what}",
        )
        self.assertEqual(now["iterations"], before["iterations"], what)
        self.assertEqual(now["position"], before["position"], what)
        self.assertEqual(now["metrics"], before["metrics"], what)

    def train(self, step):
        code, reply = _raw(self.f.c0, self.f.envelope(step).SerializeToString())
        self.assertEqual(code, Code.OK, reply)
        return reply

    # ------------------------------------------------------------ 1. auth
    def test_authentication(self):
        f = self.f
        self.train(1)  # a step into the turn: a refused BEGIN must not roll back
        before = f.snapshot()
        self.assertEqual(before["position"], (0, 0, 1))
        envelope = f.envelope(2)  # valid: it is applied below with the right token
        wrong = f.connect(0, "not-the-token")
        unknown = f.connect(7, TOKENS[0])
        other = f.connect(1, TOKENS[1])
        calls = {
            "Join": ("Join", wire_pb2.JoinRequest(client_id=0), wire_pb2.JoinReply),
            "BEGIN": ("Exchange", f.control(Kind.BEGIN), wire_pb2.Envelope),
            "TRAIN": ("Exchange", envelope, wire_pb2.Envelope),
            "END": ("Exchange", f.control(Kind.END, step=1), wire_pb2.Envelope),
        }
        refused = f.host.refused
        for what, (method, request, reply_type) in calls.items():
            with self.subTest(what=what):
                _refused(
                    self,
                    Code.UNAUTHENTICATED,
                    "wrong token for client 0",
                    wrong.call,
                    method,
                    request,
                    reply_type,
                )
                self.assertUnchanged(before, f"after a wrong token ({what})")
                unknown_request = type(request)()
                unknown_request.CopyFrom(request)
                unknown_request.client_id = 7
                _refused(
                    self,
                    Code.UNAUTHENTICATED,
                    "unknown client 7",
                    unknown.call,
                    method,
                    unknown_request,
                    reply_type,
                )
                self.assertUnchanged(before, f"after an unknown client ({what})")
                _refused(
                    self,
                    Code.PERMISSION_DENIED,
                    "client 1 cannot speak for client 0",
                    other.call,
                    method,
                    request,
                    reply_type,
                )
                self.assertUnchanged(before, f"after a foreign body ({what})")
                for metadata in (
                    (),
                    (("x-splitkeras-client", "zero"), ("x-splitkeras-token", "tok0")),
                ):
                    code, details = _raw(
                        f.c0, request.SerializeToString(), method, metadata
                    )
                    self.assertEqual(code, Code.UNAUTHENTICATED, details)
                    self.assertIn("missing or malformed client id metadata", details)
                    self.assertUnchanged(before, f"after bad metadata ({what})")
                code, details = _raw(
                    f.c0,
                    request.SerializeToString(),
                    method,
                    (("x-splitkeras-client", "0"),),  # no token at all
                )
                self.assertEqual(code, Code.UNAUTHENTICATED, details)
                self.assertIn("wrong token for client 0", details)
        self.assertEqual(f.host.refused, refused + 6 * len(calls))
        # The envelope itself was fine: with the right credentials it trains.
        reply = f.c0.call("Exchange", envelope, wire_pb2.Envelope)
        self.assertEqual(reply.kind, Kind.GRADIENTS)
        self.assertEqual(f.host.position(), (0, 0, 2))

    # ------------------------------------------------------------- 2. TLS
    def test_mutual_tls_binds_the_client_id_to_the_certificate(self):
        """Under mutual TLS a client's certificate names it ("client-<id>"):
        a call claiming another id (with that id's own token) is refused
        and changes nothing; the certificate's own id is served."""
        f = self.f
        certs = os.path.join(f.dir, "mutual")
        tls.write_credentials(certs, clients=2)
        mtls_server, port = start_host(
            f.host, "127.0.0.1:0", credentials=tls.server_credentials(certs, True)
        )
        self.addCleanup(lambda: mtls_server.stop(grace=None).wait())
        target = f"127.0.0.1:{port}"
        before = f.snapshot()
        as_client_1 = tls.channel_credentials(certs, client_id=1)
        impostor = f.connect(0, TOKENS[0], as_client_1, target)
        calls = {
            "Join": ("Join", wire_pb2.JoinRequest(client_id=0), wire_pb2.JoinReply),
            "BEGIN": ("Exchange", f.control(Kind.BEGIN), wire_pb2.Envelope),
        }
        for what, (method, request, reply_type) in calls.items():
            with self.subTest(what=what):
                _refused(
                    self,
                    Code.PERMISSION_DENIED,
                    "the certificate of client-1 cannot call as client 0",
                    impostor.call,
                    method,
                    request,
                    reply_type,
                )
        self.assertUnchanged(before, "after calls with another client's certificate")
        own = f.connect(
            0, TOKENS[0], tls.channel_credentials(certs, client_id=0), target
        )
        info = own.call("Join", wire_pb2.JoinRequest(client_id=0), wire_pb2.JoinReply)
        self.assertEqual(info.num_clients, 2)

    def test_tls(self):
        f = self.f
        certs = os.path.join(f.dir, "certs")
        tls.write_credentials(certs)
        tls_server, port = start_host(
            f.host, "127.0.0.1:0", credentials=tls.server_credentials(certs)
        )
        try:
            target = f"127.0.0.1:{port}"
            secure = f.connect(0, TOKENS[0], tls.channel_credentials(certs), target)
            info = secure.call(
                "Join", wire_pb2.JoinRequest(client_id=0), wire_pb2.JoinReply
            )
            self.assertEqual(info.num_clients, 2)
            self.assertEqual(info.epochs, 1)
            self.assertEqual(info.codec_up, "float32")
            self.assertEqual(list(info.output_dtypes), ["float32"])
            self.assertEqual(info.run, "run")

            bad_token = f.connect(1, "tok0", tls.channel_credentials(certs), target)
            _refused(
                self,
                Code.UNAUTHENTICATED,
                "wrong token for client 1",
                bad_token.call,
                "Join",
                wire_pb2.JoinRequest(client_id=1),
                wire_pb2.JoinReply,
            )

            # Plaintext to the TLS port: the handshake fails, the handler never
            # runs. Connection waits for the channel to become ready
            # (wait_for_ready=True), so it reports DEADLINE_EXCEEDED after its
            # timeout rather than UNAVAILABLE.
            refused = f.host.refused
            plain = f.connect(0, TOKENS[0], None, target)
            started = time.monotonic()
            with self.assertRaises(RemoteError) as raised:
                plain.call(
                    "Join", wire_pb2.JoinRequest(client_id=0), wire_pb2.JoinReply
                )
            error = raised.exception
            self.assertIn(error.code, (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED))
            self.assertLess(time.monotonic() - started, CALL_TIMEOUT + 3)
            # Without waiting for readiness, the failure is UNAVAILABLE.
            code, details = _raw(
                plain, wire_pb2.JoinRequest(client_id=0).SerializeToString(), "Join"
            )
            self.assertEqual(code, Code.UNAVAILABLE, details)
            self.assertEqual(f.host.refused, refused)
        finally:
            tls_server.stop(grace=None).wait()

    # ------------------------------------------------------------ 3. fuzz
    def test_malformed_messages_are_refused_and_change_nothing(self):
        f = self.f
        # One valid step compiles the training step; then begin the turn
        # again (back to its start) so nothing of it stays.
        self.train(1)
        self.f.begin()
        before = f.snapshot()
        self.assertEqual(before["position"], (0, 0, 0))
        refused = f.host.refused
        rng = np.random.default_rng(20240601)
        results = []  # (case, code, details, refused as it should be)
        cases = _malformed_cases(f)
        for i in range(15 * len(cases)):
            name, text, make = cases[i % len(cases)]
            description, data, expected = make(rng)
            code, details = _raw(f.c0, data)
            # Refused with the right code, and for the right reason.
            right = code in expected and code in REFUSALS and text in str(details)
            results.append((f"{name}: {description}", code, details, right))
        unexpected = [
            (case, code.name, str(details)[:300])
            for case, code, details, right in results
            if not right
        ]
        self.assertGreaterEqual(len(results), 300)
        self.assertEqual(unexpected, [], f"{len(unexpected)} of {len(results)}")
        oversized = sum(code == Code.RESOURCE_EXHAUSTED for _, code, _, _ in results)
        self.assertGreater(oversized, 0)
        for case, code, details, _ in results:
            if code == Code.RESOURCE_EXHAUSTED:
                self.assertIn("larger than max", details, case)
        # Every refusal but the size limit's (gRPC's own) went through the host.
        self.assertEqual(f.host.refused - refused, len(results) - oversized)
        self.assertUnchanged(before, "after the malformed messages")

        # Then one valid step trains, and its retry is answered from the cache.
        envelope = f.envelope(f.next_step()).SerializeToString()
        code, reply = _raw(f.c0, envelope)
        self.assertEqual(code, Code.OK, reply)
        _check_gradients_reply(self, reply, before["position"][2] + 1)
        after = f.snapshot()
        self.assertFalse(f.weights_equal(after["weights"], before["weights"]))
        self.assertEqual(after["iterations"], before["iterations"] + 1)
        self.assertEqual(after["position"], (0, 0, 1))
        code, again = _raw(f.c0, envelope)
        self.assertEqual(code, Code.OK, again)
        self.assertEqual(again, reply)
        self.assertUnchanged(after, "after a retried step")

    # ----------------------------------------------------- 4. exactly once
    def test_exactly_once_and_ordering(self):
        f = self.f
        first = self.train(1)
        _check_gradients_reply(self, first, 1)
        after_first = f.snapshot()
        self.assertEqual(after_first["position"], (0, 0, 1))
        self.assertEqual(after_first["iterations"], self.start["iterations"] + 1)
        for _ in range(2):  # a retry of step 1: the cached reply, nothing applied
            self.assertEqual(self.train(1), first)
            self.assertUnchanged(after_first, "after a retry")
        for step in (0, -1):  # not a step id at all
            with self.subTest(step=step):
                _refused(
                    self,
                    Code.INVALID_ARGUMENT,
                    f"step id must be >= 1, got {step}",
                    f.c0.call,
                    "Exchange",
                    f.envelope(step),
                    wire_pb2.Envelope,
                )
                self.assertUnchanged(after_first, f"after step {step}")
        for step in (3, 1 << 40):
            with self.subTest(step=step):
                e = _refused(
                    self,
                    Code.FAILED_PRECONDITION,
                    f"step {step} of client 0 is out of order",
                    f.c0.call,
                    "Exchange",
                    f.envelope(step),
                    wire_pb2.Envelope,
                )
                self.assertIsInstance(e, TurnRestarted)
                self.assertIn("expects step 2", e.details)
                self.assertUnchanged(after_first, f"after step {step}")
        second = self.train(2)
        _check_gradients_reply(self, second, 2)
        self.assertNotEqual(second, first)
        after_second = f.snapshot()
        self.assertEqual(after_second["position"], (0, 0, 2))
        self.assertFalse(
            f.weights_equal(after_second["weights"], after_first["weights"])
        )
        self.assertEqual(self.train(2), second)
        # Only the last step is cached: an older one is out of order.
        _refused(
            self,
            Code.FAILED_PRECONDITION,
            "out of order",
            f.c0.call,
            "Exchange",
            f.envelope(1),
            wire_pb2.Envelope,
        )
        self.assertUnchanged(after_second, "after an old step")

    def test_a_reply_does_not_wait_for_the_next_message(self):
        # Steps sent ahead (max_staleness) or micro-batches: the next message
        # takes the host while it computes. A hook makes it do so between a
        # step's exchange and the rest of its call (counting its bytes); the
        # step's reply must still come back at once. It used to wait for the
        # next message's compute to end.
        f = self.f
        before = f.host.byte_counts()
        holding, release = threading.Event(), threading.Event()

        def next_message():
            with f.host._changed:
                holding.set()
                release.wait(30)

        exchange = f.host.exchange

        def exchange_then_next(*args, **kwargs):
            data = exchange(*args, **kwargs)
            threading.Thread(target=next_message, daemon=True).start()
            self.assertTrue(holding.wait(10))
            return data

        with mock.patch.object(f.host, "exchange", exchange_then_next):
            try:
                reply = self.train(1)  # CALL_TIMEOUT (5 s) if it waited
            finally:
                release.set()
        _check_gradients_reply(self, reply, 1)
        after = f.host.byte_counts()
        sent = after["bytes_up"][0] - before["bytes_up"][0]
        self.assertEqual(sent, len(f.envelope(1).SerializeToString()) + FRAME_BYTES)

    def test_train_or_evaluate_outside_a_turn_is_refused(self):
        # Only the client whose turn it is trains, and evaluates (the round's
        # last client, before it ends its turn): another's changes nothing.
        f = self.f
        before = f.snapshot()
        for kind in (Kind.TRAIN, Kind.EVALUATE):
            with self.subTest(kind=kind.name):
                _refused(
                    self,
                    Code.FAILED_PRECONDITION,
                    "client 1 is not training a turn",
                    f.c1.call,
                    "Exchange",
                    f.envelope(1, kind=kind, client_id=1),
                    wire_pb2.Envelope,
                )
                self.assertUnchanged(before, f"after a {kind.name} outside the turn")


class TurnTimeoutTest(base.TestCase):
    """A client silent for `turn_timeout` seconds loses its turn."""

    def fixture(self, **kwargs):
        f = _Fixture(turn_timeout=1.0, **kwargs)
        self.addCleanup(f.close)
        return f

    def start_turn_and_go_silent(self, f):
        start = f.snapshot()
        self.assertEqual(f.begin().status, Status.READY)
        code, reply = _raw(f.c0, f.envelope(1).SerializeToString())
        self.assertEqual(code, Code.OK, reply)
        trained = f.snapshot()
        self.assertFalse(f.weights_equal(trained["weights"], start["weights"]))
        self.assertEqual(trained["position"], (0, 0, 1))
        return start

    def assertRolledBack(self, f, start):
        now = f.snapshot()
        self.assertTrue(f.weights_equal(now["weights"], start["weights"]))
        self.assertEqual(now["iterations"], start["iterations"])
        self.assertEqual(now["position"][2], 0)
        for step in (1, 2):  # the old turn's steps, a retry and the next one
            _refused(
                self,
                Code.FAILED_PRECONDITION,
                "client 0 is not training a turn",
                f.c0.call,
                "Exchange",
                f.envelope(step),
                wire_pb2.Envelope,
            )

    def test_tick_skips_a_silent_client(self):
        now = [0.0]  # the turns' clock: the test moves it
        # No watchdog: the test ticks.
        f = self.fixture(watchdog=False, clock=lambda: now[0])
        start = self.start_turn_and_go_silent(f)
        now[0] += 0.9
        f.host.tick()  # not silent long enough yet
        self.assertEqual(f.turns.skipped, [])
        self.assertEqual(f.host.position(), (0, 0, 1))
        now[0] += 0.2
        f.host.tick()
        self.assertEqual(f.turns.skipped, [{"epoch": 0, "client": 0}])
        # The host's summary.json lists it.
        summary = HostProcess(fashion_mnist_lenet.get_config(), f.host).summary({})
        self.assertEqual(summary["skipped_turns"], [{"epoch": 0, "client": 0}])
        self.assertEqual(f.host.position(), (0, 1, 0))
        self.assertRolledBack(f, start)
        # Client 0's late calls: its turn is over (not ready: go on to the
        # next epoch), its steps are refused, and ending the turn is refused.
        passed = f.begin()
        self.assertEqual(passed.status, Status.PASSED)
        self.assertEqual(passed.round, 0)
        _refused(
            self,
            Code.FAILED_PRECONDITION,
            "not training a turn",
            f.c0.call,
            "Exchange",
            f.envelope(1),
            wire_pb2.Envelope,
        )
        _refused(
            self,
            Code.FAILED_PRECONDITION,
            "was skipped",
            f.c0.call,
            "Exchange",
            f.control(Kind.END, step=1),
            wire_pb2.Envelope,
        )
        reply = f.begin(f.c1)
        self.assertEqual(reply.status, Status.READY)
        self.assertEqual(reply.step, 0)
        self.assertEqual(f.turns.skipped, [{"epoch": 0, "client": 0}])

    def test_waiting_client_skips_a_silent_client(self):
        f = self.fixture()  # start_host: its watchdog ticks too
        # Client 0's last message comes after `started`: the skip, due a
        # turn timeout after that message, comes at least that long after it.
        started = time.monotonic()
        start = self.start_turn_and_go_silent(f)
        while True:  # client 1 polls for its turn, as run_client does
            reply = f.begin(f.c1)
            if reply.status == Status.READY or time.monotonic() - started > 8:
                break
        self.assertEqual(reply.status, Status.READY)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        self.assertEqual(reply.step, 0)
        # Client 1 may be skipped in turn if this test is slow: check the first.
        self.assertEqual(f.turns.skipped[0], {"epoch": 0, "client": 0})
        self.assertRolledBack(f, start)


class HostileInputTest(base.TestCase):
    """Messages the wire checks should refuse (INVALID_ARGUMENT, nothing
    changes), each against a fresh service: training stays possible after."""

    def setUp(self):
        super().setUp()
        self.f = _Fixture(watchdog=False)
        self.addCleanup(self.f.close)
        self.assertEqual(self.f.begin().status, Status.READY)

    def train(self, step, labels=None):
        envelope = self.f.envelope(step, labels=labels)
        return _raw(self.f.c0, envelope.SerializeToString())

    def assertRefusedAndUnchanged(self, envelope, text):
        f = self.f
        before = f.snapshot()
        data = envelope if isinstance(envelope, bytes) else envelope.SerializeToString()
        code, details = _raw(f.c0, data)
        now = f.snapshot()
        observed = {
            "code": code.name,
            "weights changed": not f.weights_equal(now["weights"], before["weights"]),
            "optimizer steps": now["iterations"] - before["iterations"],
            "position": now["position"],
            "metrics": now["metrics"],
        }
        expected = {
            "code": "INVALID_ARGUMENT",
            "weights changed": False,
            "optimizer steps": 0,
            "position": before["position"],
            "metrics": before["metrics"],
        }
        self.assertEqual(observed, expected, str(details)[:300])
        self.assertIn(text, details)
        code, reply = self.train(f.next_step())
        self.assertEqual(code, Code.OK, reply)

    @parameterized.named_parameters(
        ("float_labels_out_of_range", np.array([0, 1, 2, 7], np.float32)),
        (
            "bfloat16_nan_labels",
            np.array([0, 1, np.nan, 2], tf.bfloat16.as_numpy_dtype),
        ),
        ("column_labels_out_of_range", np.array([[0], [1], [9], [2]], np.int64)),
        ("one_hot_shaped_int_labels", np.eye(4, 3, dtype=np.int64)),
    )
    def test_bad_labels(self, labels):
        code, reply = self.train(1)
        self.assertEqual(code, Code.OK, reply)
        self.assertRefusedAndUnchanged(self.f.envelope(2, labels=labels), "labels")

    def test_labels_shape_overflowing_int64(self):
        self.assertEqual(self.train(1)[0], Code.OK)
        envelope = self.f.envelope(2)
        # 2**62 * 4 elements wrap to 0 in int64: the empty payload "fits".
        envelope.labels.CopyFrom(
            wire_pb2.Array(dtype="int64", shape=[1 << 62, 4], data=b"")
        )
        self.assertRefusedAndUnchanged(envelope, "labels")

    def test_part_shape_overflowing_int64(self):
        self.assertEqual(self.train(1)[0], Code.OK)
        envelope = self.f.envelope(2)
        part = envelope.tensors[0].parts[0]
        part.shape[:] = [1 << 62, 4]
        part.data = b""
        self.assertRefusedAndUnchanged(envelope, "tensor 0")

    def test_empty_batch(self):
        self.assertEqual(self.train(1)[0], Code.OK)
        envelope = self.f.envelope(
            2,
            images=np.zeros((0, 8, 8, 1), np.float32),
            labels=np.zeros((0,), np.int64),
        )
        self.assertRefusedAndUnchanged(envelope, "batch")

    def test_scalars_keep_their_shape_on_the_wire(self):
        code, reply = self.train(1)
        self.assertEqual(code, Code.OK, reply)
        loss = wire_pb2.Envelope.FromString(reply).loss
        self.assertEqual(list(loss.shape), [])  # the loss is a scalar
        self.assertEqual(list(wire.to_array(np.float32(1.5)).shape), [])
        self.assertEqual(wire.from_array(wire.to_array(np.int64(2)), "x").shape, ())

    def framed(self, step, images=None):
        """A valid TRAIN body as the client link sends it (`wire.frame`)."""
        envelope = wire_pb2.Envelope(kind=int(Kind.TRAIN), client_id=0, step=step)
        payloads = []
        wire.encode_tensor(
            CODEC, self.f.cut_tensor(images), envelope.tensors.add(), payloads
        )
        wire.fill_array(envelope.labels, self.f.labels, payloads)
        return wire.frame(envelope, payloads)

    def test_malformed_frames_are_refused_and_change_nothing(self):
        f = self.f
        self.assertEqual(self.train(1)[0], Code.OK)
        valid = self.framed(2)
        header = int.from_bytes(valid[1:5], "little")
        nan_images = f.images.copy()
        nan_images[0, 0, 0, 0] = np.nan
        rng = np.random.default_rng(7)
        cases = [("frame with a NaN activation", self.framed(2, nan_images))]
        for cut_at in rng.integers(1, len(valid) - 1, 40):
            cases.append((f"frame cut at byte {cut_at}", valid[:cut_at]))
        for extra in (1, 4, 100):
            cases.append((f"{extra} trailing bytes", valid + bytes(extra)))
        for size in (0, header - 1, header + 1, 1 << 31):
            body = valid[:1] + size.to_bytes(4, "little") + valid[5:]
            cases.append((f"header length {size}", body))
        for i in range(20):
            garbage = bytes(rng.integers(0, 256, int(rng.integers(1, 300)), np.uint8))
            cases.append((f"garbage frame {i}", b"\x00" + garbage))
        before = f.snapshot()
        for name, body in cases:
            code, details = _raw(f.c0, body)
            self.assertEqual(code, Code.INVALID_ARGUMENT, f"{name}: {details}")
        now = f.snapshot()
        self.assertTrue(f.weights_equal(now["weights"], before["weights"]))
        self.assertEqual(now["iterations"], before["iterations"])
        self.assertEqual(now["position"], before["position"])
        # The valid frame then trains, and the reply is framed too.
        code, reply = _raw(f.c0, valid)
        self.assertEqual(code, Code.OK, reply)
        self.assertEqual(reply[:1], b"\x00")
        envelope, payloads = wire.open_body(reply, "reply")
        self.assertEqual(envelope.kind, Kind.GRADIENTS)
        parts = wire.check_encoded(
            envelope.tensors[0], CODEC, tf.float32, [BATCH, *CUT_SHAPE], "g", payloads
        )
        self.assertEqual(parts[0].shape, (BATCH, *CUT_SHAPE))
        self.assertEqual(f.snapshot()["iterations"], before["iterations"] + 1)

    def test_a_long_refusal_is_cut(self):
        # A 10,000-dimension shape: its refusal names it, cut to 1,000
        # characters (a status travels in a header gRPC limits to 8 KiB).
        envelope = self.f.envelope(1)
        del envelope.tensors[0].shape[:]
        envelope.tensors[0].shape.extend([1] * 10_000)
        code, details = _raw(self.f.c0, envelope.SerializeToString())
        self.assertEqual(code, Code.INVALID_ARGUMENT)
        self.assertRegex(details, r"\.\.\. \(\d+ characters\)$")
        self.assertEqual(len(details.rsplit("...", 1)[0]), 1000)

    def test_label_rank_change_keeps_training_possible(self):
        # (batch, 1) labels are refused, naming the shape; (batch,) labels
        # still train afterwards.
        before = self.f.snapshot()
        code, details = self.train(1, labels=self.f.labels[:, None])
        self.assertEqual(
            (code, details),
            (
                Code.INVALID_ARGUMENT,
                "labels have shape [4, 1], expected [4] (one class id per example)",
            ),
        )
        self.assertTrue(
            self.f.weights_equal(self.f.snapshot()["weights"], before["weights"])
        )
        for _ in range(2):
            code, reply = self.train(self.f.next_step())
            self.assertEqual(code, Code.OK, reply)


def _malformed_cases(f):
    """[(name, text its refusal says, make(rng) -> (description, bytes, codes))]."""
    images = f.images

    def valid(step=1, batch=BATCH):
        e = wire_pb2.Envelope(kind=int(Kind.TRAIN), client_id=0, step=step)
        e.tensors.append(wire.encode_tensor(CODEC, f.cut_tensor(images[:batch])))
        e.labels.CopyFrom(wire.to_array(f.labels[:batch]))
        return e

    batch_envelopes = {b: valid(batch=b) for b in range(1, BATCH + 1)}
    step = f.next_step  # the step a valid message would carry now

    def fresh(rng):
        e = wire_pb2.Envelope()
        e.CopyFrom(batch_envelopes[int(rng.integers(1, BATCH + 1))])
        e.step = step()
        return e

    def done(description, e, *codes):
        data = e if isinstance(e, bytes) else e.SerializeToString()
        return description, data, set(codes or [Code.INVALID_ARGUMENT])

    # What the refusal of each kind of message must say.
    texts = {
        "wrong_shape": "tensor 0: ",
        "wrong_dtype": "tensor 0: dtype",
        "wrong_codec": "tensor 0: encoded with codec",
        "tensor_count": "tensors, the server expects 1",
        "part_count": "wire parts, codec 'float32' sends 1",
        "part_size": "(truncated or padded)",
        "part_dtype": "tensor 0: wire part 0 has dtype",
        "part_shape": "tensor 0: wire part 0 has shape",
        "negative_dims": "negative dimension in shape",
        "non_finite": "tensor 0: has non-finite values",
        "labels_length": "labels have shape",
        "labels_range": "labels must be class ids in [0, 3)",
        "labels_missing": "TRAIN without labels",
        "labels_bad": "labels",
        "sample_weight": "sample_weight",
        "step_order": "is out of order",
        "step_id": "step id must be >= 1",
        "kind": "message",
        "client_id": "cannot speak for client",
        "truncated_envelope": "",
        "random_bytes": "",
        "evaluate_or_predict": "",
        "oversized": "Received message larger than max",
    }

    def array(values, dtype):
        return wire.to_array(np.asarray(values, dtype))

    def wrong_shape(rng):
        e = fresh(rng)
        b = e.tensors[0].shape[0]
        shape = [
            [b, 8, 8, 3],
            [b, 8, 8],
            [b, 4, 4, 2],
            [b, 8, 8, 2, 1],
            [b, 128],
            [b],
            [],
            [1 << 61, 8, 8, 2],
            [b, 9, 8, 2],
        ][int(rng.integers(9))]
        x = rng.normal(size=shape if shape and shape[0] < 1 << 20 else [b]).astype(
            np.float32
        )
        e.tensors[0].CopyFrom(
            wire_pb2.Encoded(
                codec="float32", dtype="float32", shape=shape, parts=[wire.to_array(x)]
            )
        )
        return done(f"shape {shape}", e)

    def wrong_dtype(rng):
        e = fresh(rng)
        name = [
            "float64",
            "float16",
            "bfloat16",
            "int32",
            "int8",
            "",
            "complex64",
            "x",
        ][int(rng.integers(8))]
        e.tensors[0].dtype = name
        if name in ("float64", "float16", "int32", "int8") and rng.random() < 0.5:
            x = wire.from_array(e.tensors[0].parts[0], "x").astype(name)
            e.tensors[0].parts[0].CopyFrom(wire.to_array(x))
        return done(f"dtype {name!r}", e)

    def wrong_codec(rng):
        e = fresh(rng)
        name = [
            "int8",
            "float16",
            "bfloat16",
            "int8_channel",
            "topk:0.5",
            "",
            "FLOAT32",
            "float32 ",
            "zip",
        ][int(rng.integers(9))]
        e.tensors[0].codec = name
        return done(f"codec {name!r}", e)

    def tensor_count(rng):
        e = fresh(rng)
        n = [0, 2, 3, 17][int(rng.integers(4))]
        encoded = e.tensors[0]
        del e.tensors[:]
        for _ in range(n):
            e.tensors.append(encoded)
        return done(f"{n} tensors", e)

    def part_count(rng):
        e = fresh(rng)
        n = [0, 2, 3][int(rng.integers(3))]
        part = e.tensors[0].parts[0]
        del e.tensors[0].parts[:]
        for _ in range(n):
            e.tensors[0].parts.append(part)
        return done(f"{n} wire parts", e)

    def part_size(rng):
        e = fresh(rng)
        part = e.tensors[0].parts[0]
        n = len(part.data)
        cut_or_pad = int(rng.integers(1, n + 1)) * (1 if rng.random() < 0.5 else -1)
        if cut_or_pad > 0:
            part.data = part.data + rng.bytes(cut_or_pad)
        else:
            part.data = part.data[:cut_or_pad]
        return done(f"part data {cut_or_pad:+d} bytes", e)

    def part_dtype(rng):
        e = fresh(rng)
        part = e.tensors[0].parts[0]
        name = ["float64", "float16", "int32", "bool", "", "uint8"][
            int(rng.integers(6))
        ]
        x = wire.from_array(part, "x")
        if name in ("float64", "float16", "int32", "uint8"):
            part.CopyFrom(wire.to_array(x.astype(name)))
        else:
            part.dtype = name
        return done(f"part dtype {name!r}", e)

    def part_shape(rng):
        e = fresh(rng)
        part = e.tensors[0].parts[0]
        b = e.tensors[0].shape[0]
        shape = [[b, 128], [b * 128], [128, b], [b, 8, 2, 8], [1, b, 8, 8, 2]][
            int(rng.integers(5))
        ]
        part.shape[:] = shape
        return done(f"part shape {shape}", e)

    def negative_dims(rng):
        e = fresh(rng)
        b = e.tensors[0].shape[0]
        where = int(rng.integers(2))
        if where == 0:
            e.tensors[0].shape[0] = -b
            e.tensors[0].parts[0].shape[0] = -b
        else:
            e.tensors[0].parts[0].shape[:] = [-b, -8, 8, 2]
        return done(f"negative dims ({'encoded' if where == 0 else 'part'})", e)

    def non_finite(rng):
        e = fresh(rng)
        x = wire.from_array(e.tensors[0].parts[0], "x").copy()
        bad = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        x.flat[int(rng.integers(x.size))] = bad
        e.tensors[0].parts[0].CopyFrom(wire.to_array(x))
        return done(f"activation {bad}", e)

    def labels_length(rng):
        e = fresh(rng)
        b = e.tensors[0].shape[0]
        n = int(rng.choice([k for k in range(0, 9) if k != b]))
        e.labels.CopyFrom(array(rng.integers(0, CLASSES, n), np.int64))
        return done(f"{n} labels for a batch of {b}", e)

    def labels_range(rng):
        e = fresh(rng)
        b = e.tensors[0].shape[0]
        dtype = ["int64", "int32", "int8", "uint8"][int(rng.integers(4))]
        info = np.iinfo(dtype)
        bad = int(
            rng.choice(
                [
                    v
                    for v in (CLASSES, 4, 100, info.max, -1, info.min)
                    if info.min <= v <= info.max and not 0 <= v < CLASSES
                ]
            )
        )
        y = rng.integers(0, CLASSES, b).astype(dtype)
        y[int(rng.integers(b))] = bad
        e.labels.CopyFrom(wire.to_array(y))
        return done(f"{dtype} label {bad}", e)

    def labels_missing(rng):
        e = fresh(rng)
        e.ClearField("labels")
        if rng.random() < 0.5:
            e.sample_weight.CopyFrom(array(np.ones(e.tensors[0].shape[0]), np.float32))
        return done("no labels", e)

    def labels_bad(rng):
        e = fresh(rng)
        b = e.tensors[0].shape[0]
        which = int(rng.integers(6))
        if which == 0:
            e.labels.dtype = ["bool", "string", "float128", "", "int16"][
                int(rng.integers(5))
            ]
            what = f"label dtype {e.labels.dtype!r}"
        elif which == 1:
            e.labels.data = e.labels.data[: int(rng.integers(len(e.labels.data)))]
            what = "truncated labels"
        elif which == 2:
            e.labels.data += rng.bytes(int(rng.integers(1, 9)))
            what = "padded labels"
        elif which == 3:
            dtype = ["float16", "float32", "float64"][int(rng.integers(3))]
            y = np.zeros(b, dtype)
            y[int(rng.integers(b))] = [np.nan, np.inf][int(rng.integers(2))]
            e.labels.CopyFrom(wire.to_array(y))
            what = f"non-finite {dtype} label"
        elif which == 4:
            e.labels.CopyFrom(_scalar(1, np.int64))
            what = "scalar labels"
        else:
            e.labels.shape[:] = [b, -1]
            what = "negative label dimension"
        return done(what, e)

    def sample_weight(rng):
        e = fresh(rng)
        b = e.tensors[0].shape[0]
        which = int(rng.integers(3))
        if which == 0:
            shape = [(b + 1,), (b, 1), (), (b - 1,), (1, b), (2 * b,)][
                int(rng.integers(6))
            ]
            w = np.ones(shape, np.float32)
            what = f"sample_weight shape {list(shape)}"
            if not shape:
                e.sample_weight.CopyFrom(_scalar(1.0, np.float32))
                return done(what, e)
        elif which == 1:
            dtype = ["float16", "float32", "float64", "bfloat16"][int(rng.integers(4))]
            w = np.ones(b, tf.as_dtype(dtype).as_numpy_dtype)
            w[int(rng.integers(b))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
            what = f"non-finite {dtype} sample_weight"
        else:
            w = np.ones(b, np.float32)
            e.sample_weight.CopyFrom(wire.to_array(w))
            e.sample_weight.data = e.sample_weight.data[:-1]
            return done("truncated sample_weight", e)
        e.sample_weight.CopyFrom(wire.to_array(w))
        return done(what, e)

    def step_order(rng):
        e = fresh(rng)
        s = step()
        bad = int(rng.choice([s + 1, s + 2, 1 << 62, (1 << 63) - 1]))
        e.step = bad
        return done(f"step {bad} (expected {s})", e, Code.FAILED_PRECONDITION)

    def step_id(rng):
        e = fresh(rng)
        e.step = int(rng.choice([0, -1, -(1 << 40), -(1 << 63)]))
        return done(f"step {e.step}", e)

    def kind(rng):
        e = fresh(rng)
        k = int(rng.choice([0, 2, 3, 4, 7, 8, 99, -1, (1 << 31) - 1]))
        e.kind = k
        return done(f"kind {wire.kind_name(k)}", e)

    def client_id(rng):
        e = fresh(rng)
        e.client_id = int(rng.choice([1, 7, -1, (1 << 31) - 1]))
        return done(f"body client {e.client_id}", e, Code.PERMISSION_DENIED)

    def truncated_envelope(rng):
        e = fresh(rng)
        data = e.SerializeToString()
        n = int(rng.integers(0, len(data)))
        return done(
            f"envelope truncated to {n} of {len(data)} bytes",
            data[:n],
            Code.INVALID_ARGUMENT,
            Code.FAILED_PRECONDITION,
        )

    def random_bytes(rng):
        n = int(rng.choice([0, 1, 2, 5, 16, 64, 300, 2000]))
        return done(
            f"{n} random bytes",
            rng.bytes(n),
            Code.INVALID_ARGUMENT,
            Code.FAILED_PRECONDITION,
            Code.PERMISSION_DENIED,
        )

    def evaluate_or_predict(rng):
        e = fresh(rng)
        which = int(rng.integers(5))
        if which == 0:
            e.kind = int(Kind.PREDICT)
            return done("PREDICT with labels", e)
        e.kind = int(Kind.EVALUATE)
        if which == 1:
            e.ClearField("labels")
            return done("EVALUATE without labels", e)
        if which == 2:
            e.tensors[0].shape[1] = 9
            e.step = 1
            return done("EVALUATE of the wrong shape", e)
        if which == 3:
            e.step = int(rng.choice([0, 2, 5, -3]))
            return done(f"EVALUATE batch {e.step}", e, Code.FAILED_PRECONDITION)
        e.step = 1
        e.tensors[0].codec = "int8"
        return done("EVALUATE with the wrong codec", e)

    def oversized(rng):
        e = fresh(rng)
        size = 2 << 20
        where = int(rng.integers(3))
        if where == 0:
            e.ids.CopyFrom(
                wire_pb2.Array(dtype="uint8", shape=[size], data=bytes(size))
            )
        elif where == 1:
            e.tensors[0].parts[0].data += rng.bytes(size)
        else:
            e.labels.CopyFrom(array(np.zeros(size // 8), np.int64))
        return done(f"2 MiB message ({where})", e, Code.RESOURCE_EXHAUSTED)

    return [
        (fn.__name__, texts[fn.__name__], fn)
        for fn in (
            wrong_shape,
            wrong_dtype,
            wrong_codec,
            tensor_count,
            part_count,
            part_size,
            part_dtype,
            part_shape,
            negative_dims,
            non_finite,
            labels_length,
            labels_range,
            labels_missing,
            labels_bad,
            sample_weight,
            step_order,
            step_id,
            kind,
            client_id,
            truncated_envelope,
            random_bytes,
            evaluate_or_predict,
            oversized,
        )
    ]


class CodecPartShapeTest(base.TestCase):
    """A small message must not decode (or broadcast) into a huge tensor."""

    def _encoded(self, codec_name, parts, shape):
        codec = get_codec(codec_name)
        return codec, wire.encoded_from_parts(codec, tf.float32, shape, parts)

    def test_amplifying_parts_are_refused(self):
        shape = [4096, 8, 8, 2]
        cases = {
            "topk:0.1": [np.ones(1, np.float32), np.zeros(1, np.int32)],
            "int8": [np.ones((4096, 1, 1, 1), np.int8), np.ones((), np.float32)],
            "int8_channel": [
                np.ones(shape, np.int8),
                np.ones((1, 8, 8, 2), np.float32),
            ],
        }
        for name, parts in cases.items():
            codec, encoded = self._encoded(name, parts, shape)
            with self.assertRaisesRegex(wire.WireError, "wire part . has shape"):
                wire.check_encoded(encoded, codec, tf.float32, [None, 8, 8, 2], "t")

    def test_exact_parts_pass(self):
        x = tf.random.normal([4, 8, 8, 2])
        for name in ("float16", "int8", "int8_channel", "topk:0.1"):
            codec = get_codec(name)
            encoded = wire.encode_tensor(codec, x)
            parts = wire.check_encoded(encoded, codec, tf.float32, [None, 8, 8, 2], "t")
            decoded = wire.decode_tensor(codec, encoded, parts, "t")
            self.assertEqual(decoded.shape, (4, 8, 8, 2))
