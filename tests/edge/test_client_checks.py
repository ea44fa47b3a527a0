"""What clients check without a server: malformed replies are refused alike
by the edge client and the Keras client's GrpcLink; the edge client checks
its model against edge.json and its handoff key before it connects, and
takes its gRPC limits from edge.json (the run's config.grpc)."""

import os
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.edge import EdgeClient, EdgeSpec
from splitkeras.edge import client as edge_client
from splitkeras.export import export_segment
from splitkeras.protocol import Kind
from splitkeras.transport import wire
from splitkeras.transport.grpc_link import GrpcLink
from splitkeras.transport.proto import wire_pb2
from splitkeras.transport.turns import TurnClient
from tests import base

SHAPE = [2, 4]  # the gradient the clients expect: batch 2, 4 features
GOOD = {
    "codec": "int8",
    "dtype": "float32",
    "shape": SHAPE,
    "parts": [np.ones(SHAPE, np.int8), np.float32(0.5)],
}


def _reply(kind=Kind.GRADIENTS, step=1, tensors=(GOOD,), truncate=False):
    """A reply envelope with its array bytes inline (no frame payloads)."""
    reply = wire_pb2.Envelope(kind=int(kind), step=step)
    for t in tensors:
        encoded = wire.encoded_from_parts(
            t["codec"], t["dtype"], t["shape"], t["parts"], reply.tensors.add()
        )
        if truncate:
            encoded.parts[0].data = encoded.parts[0].data[:-1]
    return reply


def _with(**changes):
    return {**GOOD, **changes}


MALFORMED = (
    ("kind", _reply(kind=Kind.ACK), "expected a GRADIENTS reply for step 1, got ACK"),
    ("step", _reply(step=7), "for step 1, got GRADIENTS for step 7"),
    ("count", _reply(tensors=(GOOD, GOOD)), "has 2 tensors, expected 1"),
    ("codec", _reply(tensors=(_with(codec="float32"),)), "with codec 'float32'"),
    ("dtype", _reply(tensors=(_with(dtype="float16"),)), "dtype 'float16', expected"),
    ("shape", _reply(tensors=(_with(shape=[2, 5]),)), r"shape \[2, 5\], expected"),
    (
        "part_count",
        _reply(tensors=(_with(parts=GOOD["parts"][:1]),)),
        "1 wire parts, codec 'int8' sends 2",
    ),
    (
        "part_dtype",
        _reply(tensors=(_with(parts=[np.ones(SHAPE, np.int32), np.float32(1)]),)),
        "wire part 0 has dtype 'int32'",
    ),
    (
        "part_shape",
        _reply(tensors=(_with(parts=[GOOD["parts"][0], np.ones(4, np.float32)]),)),
        r"wire part 1 has shape \[4\], codec 'int8' sends \[\]",
    ),
    ("truncated", _reply(truncate=True), "payload has 7 bytes"),
)


def _check_keras_reply(reply) -> list:
    """What the Keras client's GrpcLink makes of a GRADIENTS `reply`."""
    link = GrpcLink(
        None,
        [tf.float32],
        [tf.TensorShape([None, *SHAPE[1:]])],
        ["float32"],
        codec_down="int8",
    )
    sent = (1, 0)  # step 1, the whole batch
    return link._check_reply(reply, wire.Payloads(), sent, Kind.GRADIENTS, link.cut)


class _Connection:
    """Stands for `Connection`: records how it was made and what was called;
    Join answers, Exchange returns `reply`."""

    made = []

    def __init__(self, target, client_id, **settings):
        self.client_id, self.settings, self.calls = client_id, settings, []
        self.reply = None
        _Connection.made.append(self)

    def call(self, method, request, reply_type):
        self.calls.append(method)
        if method != "Join":
            raise AssertionError(f"{method} called")
        return wire_pb2.JoinReply(
            num_clients=1, epochs=1, output_dtypes=["float32"],
            codec_up="float32", codec_down="int8",
        )  # fmt: skip

    def exchange(self, envelope, payloads):
        self.calls.append("Exchange")
        return self.reply, wire.Payloads()


class ClientChecksTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.backend.clear_session()
        inputs = keras.Input((3,))
        segment = keras.Model(inputs, keras.layers.Dense(4)(inputs))
        cls.out = os.path.join(tempfile.mkdtemp(dir=os.environ["TMPDIR"]), "export")
        export_segment(
            segment, keras.optimizers.SGD(), cls.out, training=False, quantize=()
        )
        cls.model = os.path.join(cls.out, "client.tflite")  # inference only

    def _spec(self, **changes):
        fields = dict(
            input_shape=[3], cut_shapes=[[4]], max_message_mb=5,
            timeout_seconds=7.0, retry_seconds=11.0, codec_down="int8",
        )  # fmt: skip
        return EdgeSpec(**{**fields, **changes})

    def _edge(self, spec=None, key=None, **kwargs):
        _Connection.made.clear()
        with mock.patch.object(edge_client, "Connection", _Connection):
            return EdgeClient(
                self.model, spec or self._spec(), "unused:1", 0, key, **kwargs
            )

    def test_grpc_limits_come_from_edge_json(self):
        client = self._edge()
        self.assertEqual(
            client.connection.settings,
            {
                "token": None,
                "credentials": None,
                "max_message_bytes": 5 << 20,
                "timeout": 7.0,
                "retry_seconds": 11.0,
            },
        )
        overridden = self._edge(timeout=1.5, max_message_bytes=1 << 20)
        self.assertEqual(overridden.connection.settings["timeout"], 1.5)
        self.assertEqual(overridden.connection.settings["max_message_bytes"], 1 << 20)
        self.assertEqual(overridden.connection.settings["retry_seconds"], 11.0)

    def test_a_spec_of_another_model_is_refused_before_connecting(self):
        for changes, shown in (
            ({"input_shape": [5]}, r"edge.json describes \[5\]"),
            ({"cut_shapes": [[4], [4]]}, r"and \[\[4\], \[4\]\]"),
        ):
            with self.assertRaisesRegex(ValueError, shown):
                self._edge(self._spec(**changes))
            self.assertEqual(_Connection.made, [])

    def test_turns_need_a_key_and_a_trainable_model(self):
        # A key with an inference-only model: refused before connecting.
        with self.assertRaisesRegex(ValueError, "inference-only export"):
            self._edge(key=bytes(32))
        self.assertEqual(_Connection.made, [])
        # No key: split inference only; turns are refused before any call.
        client = self._edge(test=(np.zeros((1, 3)), np.zeros(1)))
        with self.assertRaisesRegex(ValueError, "without the clients' handoff key"):
            client.run()
        self.assertEqual(client.connection.calls, ["Join"])
        turns = TurnClient.__new__(TurnClient)
        turns._sealer, turns.client_id = None, 3
        with self.assertRaisesRegex(ValueError, "client 3 was made without"):
            turns.begin_turn(0)

    @parameterized.named_parameters(*MALFORMED)
    def test_malformed_replies_are_refused_by_both_clients(self, reply, message):
        edge = self._edge()
        edge.connection.reply = reply
        cut = np.zeros(SHAPE, np.float32)
        with self.assertRaisesRegex(wire.WireError, message):
            edge._exchange(1, 1, [cut], None, 2, [SHAPE], ["float32"])

        with self.assertRaisesRegex(wire.WireError, message):
            _check_keras_reply(reply)

    def test_a_well_formed_reply_decodes(self):
        edge = self._edge()
        edge.connection.reply = _reply()
        cut = np.zeros(SHAPE, np.float32)
        (grad,), _ = edge._exchange(1, 1, [cut], None, 2, [SHAPE], ["float32"])
        np.testing.assert_array_equal(grad, np.full(SHAPE, 0.5, np.float32))
        _, q, scale, shape = _check_keras_reply(_reply())
        np.testing.assert_array_equal(q, GOOD["parts"][0])
        self.assertEqual((scale, list(shape)), (0.5, SHAPE))
        # ... but not with a non-finite value in it.
        edge.connection.reply = _reply(
            tensors=(_with(parts=[GOOD["parts"][0], np.float32(np.inf)]),)
        )
        with self.assertRaisesRegex(wire.WireError, "non-finite"):
            edge._exchange(1, 1, [cut], None, 2, [SHAPE], ["float32"])
