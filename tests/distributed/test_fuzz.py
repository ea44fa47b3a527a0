"""Generated fuzzing of the gRPC host (hypothesis), over real gRPC on
127.0.0.1: every message kind (Join, BEGIN, TRAIN, OUTPUT_GRADIENTS,
EVALUATE, PREDICT, END with a state, REPORT, HANDOFF, WEIGHTS, FETCH, ...),
every wire codec (float32, float16, int8_channel, topk:0.1) and a U-shaped
server with a step open.

The inputs are valid messages with one to three fields changed (kind, ids,
step, row offsets, codec, dtype, shape, payload bytes, non-finite values,
labels, weights, state, metrics, tensors dropped or repeated), random
envelopes, random bytes, and valid messages with a wrong token. After every
input the host has answered with a status (never INTERNAL or UNKNOWN, the
text bounded) and, when it refused the input, its state is what it was:
weights, optimizer steps, the round-robin position and the training
metrics. An input it accepted (a changed field that does not make a message
invalid, such as other sample weights) is undone by beginning the turn
again, which must give back the state before it. Afterwards honest steps on
the fuzzed host equal the same steps on a fresh one, to the bit.
"""

import collections

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from splitkeras.protocol import Kind
from splitkeras.transport import wire
from splitkeras.transport.codec import get_codec
from splitkeras.transport.proto import wire_pb2
from tests import base
from tests.distributed.test_service import BATCH, TOKENS, _Fixture, _raw

Code = grpc.StatusCode
# Inputs per host: 5,000 in all.
HOSTS = {
    ("float32", False): 1300,
    ("float16", False): 800,
    ("int8_channel", False): 800,
    ("topk:0.1", False): 800,
    ("float32", True): 1300,
}
CRASHES = {Code.INTERNAL, Code.UNKNOWN}
DTYPES = [
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int32",
    "int64",
    "uint8",
    "bool",
    "float64",
    "complex64",
    "object",
    "",
    "f4",
]
CODEC_NAMES = [
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int8_channel",
    "topk",
    "topk:0.1",
    "topk:0",
    "topk:2",
    "",
    "zip",
]
PARTIES = ["", "server", "fed", "client_0", "head_0", "x" * 300]
INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([2**31 - 1, -(2**31), 2**62, 10**6]),
)


def _array(draw):
    shape = draw(st.lists(st.integers(-2, 9), max_size=5))
    return wire_pb2.Array(
        dtype=draw(st.sampled_from(DTYPES)),
        shape=shape,
        data=draw(st.binary(max_size=600)),
    )


def _set_tensor_field(data, envelope):
    if not envelope.tensors:
        envelope.tensors.add()
    tensor = envelope.tensors[data.draw(st.integers(0, len(envelope.tensors) - 1))]
    field = data.draw(st.sampled_from(["codec", "dtype", "shape", "part", "parts"]))
    if field == "codec":
        tensor.codec = data.draw(st.sampled_from(CODEC_NAMES))
    elif field == "dtype":
        tensor.dtype = data.draw(st.sampled_from(DTYPES))
    elif field == "shape":
        del tensor.shape[:]
        tensor.shape.extend(data.draw(st.lists(st.integers(-2, 70000), max_size=7)))
    elif field == "parts":
        what = data.draw(st.sampled_from(["drop", "repeat", "add"]))
        if what == "drop" and tensor.parts:
            del tensor.parts[-1]
        elif what == "repeat" and tensor.parts:
            tensor.parts.add().CopyFrom(tensor.parts[0])
        else:
            tensor.parts.add().CopyFrom(_array(data.draw))
    else:
        if not tensor.parts:
            tensor.parts.add()
        part = tensor.parts[data.draw(st.integers(0, len(tensor.parts) - 1))]
        _change_array(data, part)


def _change_array(data, array):
    how = data.draw(st.sampled_from(["cut", "extend", "flip", "nan", "dtype", "shape"]))
    raw = bytearray(array.data)
    if how == "cut":
        array.data = bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))])
    elif how == "extend":
        array.data = bytes(raw) + data.draw(st.binary(min_size=1, max_size=64))
    elif how == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
        array.data = bytes(raw)
    elif how == "nan" and len(raw) >= 4:
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e38]))
        i = data.draw(st.integers(0, len(raw) // 4 - 1)) * 4
        raw[i : i + 4] = np.float32(value).tobytes()
        array.data = bytes(raw)
    elif how == "dtype":
        array.dtype = data.draw(st.sampled_from(DTYPES))
    else:
        del array.shape[:]
        array.shape.extend(data.draw(st.lists(st.integers(-2, 70000), max_size=5)))


def _mutate(data, envelope):
    """One field of `envelope` changed, in place."""
    field = data.draw(
        st.sampled_from(
            [
                "kind",
                "client_id",
                "step",
                "to",
                "offset",
                "rows",
                "tensor",
                "tensors",
                "labels",
                "sample_weight",
                "ids",
                "loss",
                "state",
                "metrics",
                "round",
                "count",
                "status",
            ]
        )
    )
    if field == "kind":
        envelope.kind = data.draw(st.integers(-2, 20))
    elif field == "client_id":
        envelope.client_id = data.draw(st.sampled_from([1, 2, -1, 7, 2**31 - 1]))
    elif field in ("step", "offset", "rows", "round", "count"):
        setattr(envelope, field, data.draw(INTS))
    elif field == "status":
        envelope.status = data.draw(st.integers(-1, 9))
    elif field == "to":
        envelope.to = data.draw(
            st.one_of(st.sampled_from(PARTIES), st.text(max_size=8))
        )
    elif field == "tensor":
        _set_tensor_field(data, envelope)
    elif field == "tensors":
        what = data.draw(st.sampled_from(["drop", "repeat", "clear"]))
        if what == "repeat" and envelope.tensors:
            envelope.tensors.add().CopyFrom(envelope.tensors[0])
        elif what == "drop" and envelope.tensors:
            del envelope.tensors[-1]
        else:
            del envelope.tensors[:]
    elif field in ("labels", "sample_weight", "ids", "loss"):
        array = getattr(envelope, field)
        if array.ByteSize() and data.draw(st.booleans()):
            _change_array(data, array)
        else:
            array.CopyFrom(_array(data.draw))
    elif field == "state":
        envelope.state = data.draw(st.binary(max_size=300))
    else:
        envelope.metrics.clear()
        for key in data.draw(st.lists(st.text(max_size=6), max_size=3)):
            envelope.metrics[key] = data.draw(
                st.floats(allow_nan=True, allow_infinity=True)
            )


class _Host:
    """A fuzzed service: the fixture, its callers and its valid messages."""

    def __init__(self, codec, ushaped):
        self.f = _Fixture(watchdog=False, codec=codec, ushaped=ushaped)
        self.f.host.wait_seconds = 0.0  # client 1's BEGIN: WAIT at once
        self.codec, self.ushaped = get_codec(codec), ushaped
        rng = np.random.default_rng(3)
        self.output_gradients = rng.normal(size=(BATCH, 6)).astype(np.float32)

    def close(self):
        self.f.close()

    def valid(self, kind, step=1, client_id=0):
        f = self.f
        if kind in (Kind.BEGIN, Kind.END, Kind.REPORT, Kind.HANDOFF, Kind.FETCH):
            return f.control(kind, client_id, 0, step)
        envelope = wire_pb2.Envelope(kind=int(kind), client_id=client_id, step=step)
        if kind == Kind.OUTPUT_GRADIENTS:
            tensor = self.output_gradients
        else:
            tensor = f.cut_tensor()
        envelope.tensors.append(wire.encode_tensor(self.codec, tensor))
        if kind in (Kind.TRAIN, Kind.EVALUATE) and not self.ushaped:
            envelope.labels.CopyFrom(wire.to_array(f.labels))
        if kind == Kind.WEIGHTS:
            envelope.count = BATCH
        return envelope

    def kinds(self):
        kinds = [
            Kind.TRAIN,
            Kind.EVALUATE,
            Kind.PREDICT,
            Kind.BEGIN,
            Kind.END,
            Kind.REPORT,
            Kind.HANDOFF,
            Kind.WEIGHTS,
            Kind.FETCH,
            Kind.UPDATE,
            Kind.PSI,
        ]
        return kinds + ([Kind.OUTPUT_GRADIENTS] if self.ushaped else [])

    def start(self):
        """Client 0's turn begun at step 0 (U-shaped: its step 1 open)."""
        f = self.f
        f.begin()
        if self.ushaped:
            code, reply = _raw(f.c0, self.valid(Kind.TRAIN).SerializeToString())
            assert code == Code.OK, reply

    def honest_steps(self, count=2):
        """Trains `count` valid steps from the turn's start; the weights."""
        f = self.f
        f.begin()
        for step in range(1, count + 1):
            code, reply = _raw(f.c0, self.valid(Kind.TRAIN, step).SerializeToString())
            assert code == Code.OK, reply
            if self.ushaped:
                envelope = self.valid(Kind.OUTPUT_GRADIENTS, step)
                code, reply = _raw(f.c0, envelope.SerializeToString())
                assert code == Code.OK, reply
        return f.segments.server.get_weights()


def _inputs(host):
    """A strategy of (connection or None, method, body, metadata or None)."""
    f = host.f
    # Client 0 trains the turn; client 1 is not at its turn (its data
    # messages are decoded and checked, then refused by the coordinator).
    # Only client 1 sends orchestration messages and random envelopes: client
    # 0 ending its turn would commit it.
    callers = st.sampled_from([f.c0, f.c1])
    data_kinds = (Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT, Kind.OUTPUT_GRADIENTS)

    @st.composite
    def mutated(draw):
        kind = draw(st.sampled_from(host.kinds()))
        caller = draw(callers) if kind in data_kinds else f.c1
        step = draw(st.sampled_from([1, 2]))
        envelope = host.valid(kind, step, caller.client_id)
        original = envelope.SerializeToString()
        data = _Draws(draw)
        for _ in range(draw(st.integers(1, 3))):
            _mutate(data, envelope)
        body = envelope.SerializeToString()
        if body == original:  # nothing changed: change the step
            envelope.step += 100
            body = envelope.SerializeToString()
        if draw(st.booleans()):  # sent framed: payloads after the envelope
            body = _framed(envelope)
        return caller, "Exchange", body, None

    @st.composite
    def random_envelope(draw):
        envelope = wire_pb2.Envelope(
            kind=draw(st.integers(-1, 16)),
            client_id=draw(st.sampled_from([1, 1, 1, 0, -1])),
            step=draw(INTS),
        )
        for _ in range(draw(st.integers(0, 2))):
            tensor = envelope.tensors.add(
                codec=draw(st.sampled_from(CODEC_NAMES)),
                dtype=draw(st.sampled_from(DTYPES)),
                shape=draw(st.lists(st.integers(-1, 10), max_size=5)),
            )
            for _ in range(draw(st.integers(0, 3))):
                tensor.parts.add().CopyFrom(_array(draw))
        if draw(st.booleans()):
            envelope.labels.CopyFrom(_array(draw))
        envelope.state = draw(st.binary(max_size=64))
        envelope.to = draw(st.sampled_from(PARTIES[:3]))
        return f.c1, "Exchange", envelope.SerializeToString(), None

    @st.composite
    def join(draw):
        request = wire_pb2.JoinRequest(
            client_id=draw(st.sampled_from([0, 1, 2, -1, 2**31 - 1])),
            to=draw(st.sampled_from(PARTIES)),
            schedule=draw(st.text(max_size=12)),
            host=draw(st.sampled_from(["", "relay", "x" * 50])),
        )
        return draw(callers), "Join", request.SerializeToString(), None

    @st.composite
    def raw_bytes(draw):
        method = draw(st.sampled_from(["Exchange", "Join"]))
        body = draw(st.binary(max_size=400))
        if draw(st.booleans()):
            body = b"\x00" + body
        return draw(callers), method, body, None

    @st.composite
    def impostor(draw):
        kind = draw(st.sampled_from(host.kinds()))
        body = host.valid(kind).SerializeToString()
        client = draw(st.sampled_from(["0", "1", "2", "-1", "", "zero", "9" * 30]))
        token = draw(st.sampled_from(["", "tok1", "tok0x", TOKENS[0][:-1]]))
        if (client, token) == ("0", TOKENS[0]):
            token = ""
        metadata = (("x-splitkeras-client", client), ("x-splitkeras-token", token))
        return f.c0, "Exchange", body, metadata

    return st.one_of(
        mutated(),
        mutated(),
        mutated(),
        random_envelope(),
        join(),
        raw_bytes(),
        impostor(),
    )


class _Draws:
    """`st.data()`'s draw, for the mutators, inside a composite strategy."""

    def __init__(self, draw):
        self.draw = draw


def _framed(envelope):
    """`envelope` as a frame: the tensor parts' bytes after the envelope."""
    payloads = []
    copy = wire_pb2.Envelope()
    copy.CopyFrom(envelope)
    for tensor in copy.tensors:
        for part in tensor.parts:
            payloads.append(np.frombuffer(part.data, np.uint8))
            part.data = b""
    return wire.frame(copy, payloads)


class FuzzTest(base.TestCase):
    def test_generated_inputs_are_refused_and_change_nothing(self):
        results = collections.Counter()
        for (codec, ushaped), examples in HOSTS.items():
            host = _Host(codec, ushaped)
            self.addCleanup(host.close)
            with self.subTest(codec=codec, ushaped=ushaped):
                results += self._fuzz(host, examples)
                # Honest steps on the fuzzed host equal those on a fresh one.
                clean = _Host(codec, ushaped)
                self.addCleanup(clean.close)
                self.assertWeightsClose(
                    host.honest_steps(), clean.honest_steps(), atol=0.0
                )
        total = sum(results.values())
        summary = ", ".join(f"{code.name} {n}" for code, n in results.most_common())
        self.record(f"fuzz: {total} generated inputs over gRPC ({summary})")
        self.assertGreaterEqual(total, 5000)

    def _fuzz(self, host, examples):
        f = host.f
        host.start()
        start = f.snapshot()
        results = collections.Counter()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(_inputs(host))
        def one(generated):
            caller, method, body, metadata = generated
            code, details = _raw(caller, body, method, metadata)
            results[code] += 1
            self.assertNotIn(code, CRASHES, details)
            if code != Code.OK:
                self.assertLessEqual(len(details), 1100)
                self.assertState(f, start, f"after a {code.name}: {details}")
                return
            # Accepted: a prediction or evaluation changes nothing here; a
            # step (e.g. with other sample weights) is undone by beginning
            # the turn again, which gives back the state before it.
            if not self.sameState(f, start):
                # What a step may take in: never a non-finite weight.
                weights = f.segments.server.get_weights()
                self.assertTrue(all(np.isfinite(w).all() for w in weights))
                host.start()
                self.assertState(f, start, "after an accepted input was rolled back")

        one()
        self.assertGreaterEqual(sum(results.values()), examples)
        return results

    def sameState(self, f, before):
        now = f.snapshot()
        return f.weights_equal(now["weights"], before["weights"]) and all(
            now[k] == before[k] for k in ("iterations", "position", "metrics")
        )

    def assertState(self, f, before, what):
        now = f.snapshot()
        self.assertTrue(f.weights_equal(now["weights"], before["weights"]), what)
        self.assertEqual(now["iterations"], before["iterations"], what)
        self.assertEqual(now["position"], before["position"], what)
        self.assertEqual(now["metrics"], before["metrics"], what)
