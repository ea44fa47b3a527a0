"""The generic gRPC host with micro-batches and steps in flight: pieces of a
step answered in row order whatever order they arrive in, one update per
step, repeated pieces answered from the cache, a call whose client has gone
never applied, a step sent ahead waiting for the one before it."""

import time

import keras
import numpy as np
import tensorflow as tf

from splitkeras.cut import cut
from splitkeras.objective import Objective
from splitkeras.parties.server import Server
from splitkeras.protocol import Kind, Message, Status
from splitkeras.transport import wire
from splitkeras.transport.grpc_link import GrpcLink
from splitkeras.transport.proto import wire_pb2
from tests.distributed.test_service import (
    BATCH,
    CODEC,
    Code,
    FixtureCase,
    _Fixture,
    _model,
    _raw,
)

ROWS = BATCH  # a step of 4 rows in two micro-batches of 2
HALF = BATCH // 2


def _until(condition, seconds=10.0):
    """Waits until `condition()` holds (the test fails if it never does)."""
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError("the host never got there")
        time.sleep(0.02)


class PiecesTest(FixtureCase):
    @classmethod
    def fixture(cls):
        f = _Fixture()
        f.server.gradient_sums()  # as serve() makes them for micro-batches
        return f

    def setUp(self):
        super().setUp()
        self.f.turns.ahead = 0
        # As serve() sets it: micro-batches x (staleness + 1) replies kept.
        self.f.host.replies.keep = 2 * 2
        self.assertEqual(self.f.begin().status, Status.READY)  # rolls back

    def piece(self, step, offset, rows=ROWS, kind=Kind.TRAIN, first=None):
        """The micro-batch of the fixture's batch at `offset` (its rows from
        row `first`, default `offset`), as bytes."""
        f = self.f
        first = offset if first is None else first
        rows_of = slice(first, first + HALF)
        envelope = f.envelope(step, kind, images=f.images[rows_of])
        envelope.labels.CopyFrom(wire.to_array(f.labels[rows_of]))
        envelope.offset, envelope.rows = offset, rows
        return envelope.SerializeToString()

    def send(self, data):
        """Sends without waiting: the call's future."""
        connection = self.f.c0
        return connection._stubs["Exchange"].future(
            data, metadata=connection.metadata, timeout=20.0
        )

    def reference(self):
        """A server of the same start trained on the whole batch at once."""
        f = self.f
        segments = cut(_model(), "conv")
        segments.server.set_weights(self.start["weights"])
        server = Server(
            segments.server,
            keras.optimizers.SGD(0.1),
            Objective(keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        )
        reply = server.handle(
            Message(Kind.TRAIN, 0, 1, (f.cut_tensor(),), f.labels.astype(np.int64))
        )
        return [w.copy() for w in segments.server.get_weights()], reply

    def test_pieces_out_of_order_are_answered_in_order(self):
        f = self.f
        waits = f.host.waits
        late = self.send(self.piece(1, HALF))  # the second micro-batch first
        _until(lambda: f.host.waits > waits)  # it waits for row 0
        self.assertFalse(late.done())
        code, first = _raw(f.c0, self.piece(1, 0))
        self.assertEqual(code, Code.OK, first)
        second = late.result()
        now = f.snapshot()
        self.assertEqual(now["position"], (0, 0, 1))  # one step
        self.assertEqual(now["iterations"], self.start["iterations"] + 1)
        weights, reply = self.reference()
        for a, b in zip(now["weights"], weights):
            np.testing.assert_allclose(a, b, atol=1e-6)
        # Each reply holds its micro-batch's gradients and loss share.
        gradients, losses = [], []
        for data, offset in ((first, 0), (second, HALF)):
            envelope = wire_pb2.Envelope.FromString(data)
            self.assertEqual((envelope.step, envelope.offset), (1, offset))
            parts = wire.check_encoded(envelope.tensors[0], CODEC, "float32", None, "g")
            gradients.append(
                wire.decode_tensor(CODEC, envelope.tensors[0], parts, "g").numpy()
            )
            losses.append(float(wire.from_array(envelope.loss, "loss")))
        np.testing.assert_allclose(
            np.concatenate(gradients), reply.tensors[0].numpy(), atol=1e-6
        )
        self.assertAlmostEqual(sum(losses), float(reply.loss), places=5)
        # A repeated micro-batch: its reply again, nothing applied.
        self.assertEqual(_raw(f.c0, self.piece(1, HALF)), (Code.OK, second))
        self.assertEqual(_raw(f.c0, self.piece(1, 0)), (Code.OK, first))
        self.assertEqual(f.snapshot()["iterations"], now["iterations"])

    def test_a_cancelled_piece_is_never_applied(self):
        f = self.f
        refused, waits = f.host.refused, f.host.waits
        late = self.send(self.piece(1, HALF))
        _until(lambda: f.host.waits > waits)  # waiting in the host for row 0
        late.cancel()
        _until(lambda: f.host.refused > refused)  # the host gave it up
        self.assertEqual(_raw(f.c0, self.piece(1, 0))[0], Code.OK)
        # Row 0 alone: no update yet, and the host still expects row 2.
        self.assertEqual(f.snapshot()["iterations"], self.start["iterations"])
        self.assertEqual(f.host.replies.next_offset("server", 0, 1), HALF)
        self.assertEqual(_raw(f.c0, self.piece(1, HALF))[0], Code.OK)
        self.assertEqual(f.snapshot()["iterations"], self.start["iterations"] + 1)

    def test_a_client_drops_its_calls_in_flight(self):
        # What a client does when its turn fails: GrpcLink.drop_pending
        # cancels every call it has not received, and the host applies none.
        f = self.f
        link = GrpcLink(f.c0, cut_dtypes=["float32"], cut_shapes=[[None, 8, 8, 2]])
        refused, waits = f.host.refused, f.host.waits
        piece = Message(
            Kind.TRAIN,
            0,
            1,
            (f.cut_tensor(f.images[HALF:]),),
            tf.constant(f.labels[HALF:]),
            offset=HALF,
            rows=ROWS,
        )
        link.send(piece)  # the second micro-batch: it waits for the first
        _until(lambda: f.host.waits > waits)
        link.drop_pending()
        _until(lambda: f.host.refused > refused)
        self.assertEqual(link._pending, {})
        self.assertEqual(f.host.replies.next_offset("server", 0, 1), 0)
        self.assertEqual(f.snapshot()["iterations"], self.start["iterations"])

    def test_a_step_ahead_waits_for_the_one_before(self):
        f = self.f
        f.turns.ahead = 1
        waits = f.host.waits
        ahead = self.send(f.envelope(2).SerializeToString())
        _until(lambda: f.host.waits > waits)  # step 2 waits for step 1
        self.assertFalse(ahead.done())
        self.assertEqual(_raw(f.c0, f.envelope(1).SerializeToString())[0], Code.OK)
        self.assertEqual(wire_pb2.Envelope.FromString(ahead.result()).step, 2)
        self.assertEqual(f.snapshot()["position"], (0, 0, 2))
        # Past the window (step 3 is next, one ahead allowed): refused at once.
        code, details = _raw(f.c0, f.envelope(5).SerializeToString())
        self.assertEqual(code, Code.FAILED_PRECONDITION, details)
        self.assertIn("step 5 of client 0 is out of order", details)

    def test_malformed_pieces_are_refused(self):
        f = self.f
        for data, text in (
            (
                self.piece(1, 3, first=0),
                "a micro-batch of 2 rows at row 3 does not fit",
            ),
            (self.piece(1, HALF, rows=3), "does not fit in a step of 3 rows"),
            (self.piece(1, 1, rows=0), "offset 1 without the step's rows"),
            (
                self.piece(1, 0, kind=Kind.EVALUATE),
                "EVALUATE messages are not sent as micro-batches",
            ),
        ):
            with self.subTest(text):
                code, details = _raw(f.c0, data)
                self.assertEqual(code, Code.INVALID_ARGUMENT, details)
                self.assertIn(text, details)
        self.assertEqual(f.snapshot()["iterations"], self.start["iterations"])
