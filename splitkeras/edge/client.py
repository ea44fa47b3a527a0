"""A split-learning client that runs its segment with LiteRT, without TensorFlow.

`EdgeClient` speaks the same gRPC protocol as the Keras client
(`splitkeras.client_process.run_client`) to an unchanged splitkeras host: Join,
then round-robin turns (Exchange BEGIN, one Exchange per training step,
END with its sealed state), and Exchange PREDICT for split inference.
One training step:

    cut = segment.forward(x)                   # LiteRT, training mode
    Exchange(TRAIN, encode(cut), labels)  ->  GRADIENTS d loss / d cut
    segment.backward(x, gradients)             # LiteRT: update applied

The state handed on between clients is the segment's variables and its
optimizer's in `pack_state` order, sealed with the clients' AES key: edge
and Keras clients can take turns in one run. Dependencies: numpy, grpcio,
protobuf, cryptography and ai-edge-litert.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from splitkeras.edge import codecs
from splitkeras.edge.runtime import LiteSegment
from splitkeras.transport import wire
from splitkeras.transport.grpc_client import Connection, ControlLink, TurnRestarted
from splitkeras.transport.proto import wire_pb2
from splitkeras.transport.sealing import pack_arrays, unpack_arrays
from splitkeras.transport.turns import TurnClient

__all__ = [
    "EdgeClient",
    "batches",
    "eval_batches",
    "load_client_data",
    "model_inputs",
]

# splitkeras.protocol.Kind, by number (the wire carries numbers).
TRAIN, GRADIENTS, SERVER_OUTPUT, EVALUATE, PREDICT, ACK = 1, 2, 3, 5, 6, 7


def model_inputs(x) -> np.ndarray:
    """uint8 images scaled to [0, 1] in float32 (as the Keras pipeline does)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32, copy=False)


def batches(x, y, batch_size: int, seed: int, epoch: int, stream=None):
    """One epoch of (images, labels) in the order `data.train_dataset` uses."""
    entropy = [seed, epoch] if stream is None else [seed, epoch, stream]
    order = np.random.default_rng(entropy).permutation(len(x))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield model_inputs(x[index]), np.asarray(y[index], np.int64)


def eval_batches(x, y, batch_size: int):
    for start in range(0, len(x), batch_size):
        stop = start + batch_size
        yield model_inputs(x[start:stop]), np.asarray(y[start:stop], np.int64)


def load_client_data(spec, path: str | None = None, client_id: int | None = None):
    """(training shard, test split) of a client, as a Keras client takes them.

    Reads an IDX folder or .npz file (`path`, else the spec's data path) and
    keeps this client's shard of the run's partition (same seed, same
    method), so a simulated device trains on exactly what a Keras client
    with its id would. numpy only.

    Raises:
      ValueError: neither `path` nor the spec names an IDX folder or a .npz
        file (a run that reads TFDS, which the edge has not).
      FileNotFoundError: the path does not exist.
    """
    from splitkeras.data.partition import partition
    from splitkeras.data.sources import load

    source = _local_source(spec, path)
    arrays = load(spec.data_name, source, download=False)
    k = spec.client_id if client_id is None else client_id
    indices = partition(
        arrays.y_train,
        spec.num_clients,
        method=spec.partition,
        alpha=spec.dirichlet_alpha,
        seed=spec.seed,
    )[k]
    shard = (arrays.x_train[indices], arrays.y_train[indices])
    return shard, (arrays.x_test, arrays.y_test)


def _local_source(spec, path):
    """`path` or the spec's data path, if it is an IDX folder or a .npz file."""
    from splitkeras.data.idx import find_idx_files

    source = path or spec.data_path
    ask = (
        f"the edge client reads {spec.data_name!r} from an IDX folder or a .npz "
        "file (it has no TFDS): pass one (edge-client / predict --data=PATH)"
    )
    if not source:
        raise ValueError(f"edge.json names no data path; {ask}")
    source = pathlib.Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data path {str(source)!r} does not exist; {ask}")
    if source.is_file() and source.suffix == ".npz":
        return source
    if source.is_dir() and find_idx_files(source):
        return source
    raise ValueError(
        f"data path {str(source)!r} is neither a .npz file nor a folder of IDX "
        f"files (a TFDS data_dir?); {ask}"
    )


def _given(value, default):
    return default if value is None else value


def _check_shapes(segment, spec) -> None:
    """The spec describes this model: same input and cut shapes."""
    got = (segment.input_shape, segment.cut_shapes)
    want = (list(spec.input_shape), [list(s) for s in spec.cut_shapes])
    if got != want:
        raise ValueError(
            f"the model takes inputs of shape {got[0]} and gives cut tensors of "
            f"shapes {got[1]}; edge.json describes {want[0]} and {want[1]}: pass "
            "the edge.json exported with this model"
        )


class EdgeClient(TurnClient):
    """One client of a run, its segment an exported LiteRT model.

    It takes round-robin turns with the state handed on through the server
    (the run's `config.weight_handoff="server"`).

    Args:
      model: the exported `client.tflite` (path or bytes).
      spec: the run's `EdgeSpec` (edge.json).
      target: the server's "host:port".
      client_id: this client's id, 0..K-1.
      key: the clients' shared AES-256 handoff key (None: split inference
        only, no turns). A turn that finds no handed-on state (the run's
        first) starts from the state the model was exported with: export the
        untrained segment of the run's seed to start as a Keras client does.
      shard: this client's (x, y) training data.
      test: (x, y) to evaluate on when this client ends an epoch, or None.
      token / credentials: as `splitkeras.transport.grpc_client.Connection`.
      max_message_bytes / timeout / retry_seconds: override the spec's
        `max_message_mb`, `timeout_seconds`, `retry_seconds` (None: the
        spec's, i.e. the run's `config.grpc`).
      num_threads: LiteRT interpreter threads.

    Raises:
      ValueError: the spec does not describe the model (shapes), the run is
        U-shaped, a codec is not available on the edge, or a `key` comes
        with an inference-only model.
    """

    restart_errors = (TurnRestarted,)

    def __init__(
        self,
        model,
        spec,
        target: str,
        client_id: int,
        key: bytes | None = None,
        shard=None,
        test=None,
        token: str | None = None,
        credentials=None,
        max_message_bytes: int | None = None,
        timeout: float | None = None,
        retry_seconds: float | None = None,
        num_threads: int | None = None,
    ):
        if spec.ushaped:
            raise ValueError(
                "a U-shaped run keeps its tail and labels on the clients; the edge "
                "client runs vanilla runs (labels at the server)"
            )
        self.spec = spec
        self.segment = LiteSegment(model, num_threads)
        _check_shapes(self.segment, spec)
        if key is not None and not self.segment.trainable:
            raise ValueError(
                "a handoff key makes this client take training turns, but the "
                "model is an inference-only export (no forward/backward/save/"
                "restore signatures): pass the client.tflite exported with "
                "training, or no key for split inference"
            )
        for codec in (spec.codec_up, spec.codec_down):
            codecs.wire_dtypes(codec, np.float32)  # refuses codecs not here
        self.shard = shard
        self.test = test
        self._initial = self.segment.state() if self.segment.trainable else None
        connection = Connection(
            target,
            client_id,
            token=token,
            credentials=credentials,
            max_message_bytes=_given(max_message_bytes, spec.max_message_mb << 20),
            timeout=_given(timeout, spec.timeout_seconds),
            retry_seconds=_given(retry_seconds, spec.retry_seconds),
        )
        self.connection = connection
        self.info = info = connection.call(
            "Join", wire_pb2.JoinRequest(client_id=client_id), wire_pb2.JoinReply
        )
        if (info.codec_up, info.codec_down) != (spec.codec_up, spec.codec_down):
            raise ValueError(
                f"the server uses codecs {info.codec_up}/{info.codec_down}, this "
                f"client {spec.codec_up}/{spec.codec_down}"
            )
        # The edge client hands its state on through the server (sealed): run
        # the server with config.weight_handoff="server".
        super().__init__(ControlLink(connection), client_id, info.num_clients, key)
        self.output_dtypes = list(self.info.output_dtypes)
        self.steps = 0
        self.losses = []  # (step, loss the server reported) of every step
        self._predictions = 0
        self.timings = []  # (seconds on the device, seconds in the round trip)

    # ------------------------------------------------------------ messages
    def _envelope(self, kind, step, cuts, labels=None):
        envelope = wire_pb2.Envelope(kind=kind, client_id=self.client_id, step=step)
        payloads = []
        codec = self.spec.codec_up
        for cut in cuts:
            parts = codecs.encode(codec, cut)
            wire.encoded_from_parts(
                codec, cut.dtype, cut.shape, parts, envelope.tensors.add(), payloads
            )
        if labels is not None:
            wire.fill_array(envelope.labels, np.asarray(labels, np.int64), payloads)
        return envelope, payloads

    def _exchange(self, kind, step, cuts, labels, reply_kind, shapes, dtypes):
        """Sends one message; returns (decoded reply tensors, loss or None)."""
        envelope, payloads = self._envelope(kind, step, cuts, labels)
        reply, arrived = self.connection.exchange(envelope, payloads)
        if reply.kind != reply_kind or reply.step != step:
            raise wire.WireError(
                f"expected a {wire.kind_name(reply_kind)} reply for step {step}, "
                f"got {wire.kind_name(reply.kind)} for step {reply.step}"
            )
        if len(reply.tensors) != len(shapes):
            raise wire.WireError(
                f"reply has {len(reply.tensors)} tensors, expected {len(shapes)}"
            )
        tensors = [
            self._decode(encoded, shape, dtype, arrived, i)
            for i, (encoded, shape, dtype) in enumerate(
                zip(reply.tensors, shapes, dtypes)
            )
        ]
        loss = None
        if reply.HasField("loss"):
            loss = float(arrived.array(reply.loss, "loss", "loss").reshape(()))
        return tensors, loss

    def _decode(self, encoded, shape, dtype, arrived, index) -> np.ndarray:
        """A reply tensor, checked as the Keras client checks it."""
        what = f"reply tensor {index}"
        codec = self.spec.codec_down
        parts = wire.check_parts(
            encoded,
            codec,
            dtype,
            shape,
            [d.name for d in codecs.wire_dtypes(codec, dtype)],
            lambda got: codecs.part_shapes(codec, dtype, got),
            what,
            arrived,
            index,
        )
        tensor = codecs.decode(codec, parts, dtype)
        if not np.all(np.isfinite(tensor.astype(np.float32))):
            raise wire.WireError(f"{what}: has non-finite values (NaN or Inf)")
        return tensor

    # -------------------------------------------------------------- steps
    def train_step(self, x, y) -> float:
        """One training step on (x, y); returns the loss the server reported."""
        x = np.asarray(x, np.float32)
        cuts = self.segment.forward(x)
        step = self.steps + 1
        shapes = [list(c.shape) for c in cuts]
        grads, loss = self._exchange(
            TRAIN, step, cuts, y, GRADIENTS, shapes, [c.dtype.name for c in cuts]
        )
        self.segment.backward(x, grads)
        self.steps = step
        self.losses.append((step, loss))
        return loss

    def predict(self, x) -> list:
        """Split inference: the server's outputs for `x` (LiteRT serve, then the
        server segment); any time, also outside training. Each call's time on
        the device and in the round trip is kept in `timings`."""
        started = time.perf_counter()
        cuts = self.segment.serve(np.asarray(x, np.float32))
        served = time.perf_counter()
        self._predictions += 1
        outputs, _ = self._exchange(
            PREDICT,
            self._predictions,
            cuts,
            None,
            SERVER_OUTPUT,
            [None] * len(self.output_dtypes),
            self.output_dtypes,
        )
        self.timings.append((served - started, time.perf_counter() - served))
        return outputs

    def latency_ms(self) -> dict:
        """Medians and 90th percentiles of `timings` in milliseconds."""
        if not self.timings:
            return {}
        device, trip = (np.asarray(t) * 1e3 for t in zip(*self.timings))
        total = device + trip
        figures = {}
        for name, values in (
            ("device", device),
            ("round_trip", trip),
            ("total", total),
        ):
            figures[f"{name}_ms_p50"] = float(np.median(values))
            figures[f"{name}_ms_p90"] = float(np.percentile(values, 90))
        return figures

    def evaluate(self) -> None:
        """Sends the test split for evaluation (the server computes metrics)."""
        for i, (x, y) in enumerate(eval_batches(*self.test, self.spec.eval_batch_size)):
            cuts = self.segment.serve(x)
            self._exchange(EVALUATE, i + 1, cuts, y, ACK, [], [])

    # -------------------------------------------------------------- turns
    def _load_state(self, plain):
        self.segment.load_state(
            self._initial if plain is None else unpack_arrays(plain)
        )

    def _packed_state(self) -> bytes:
        return pack_arrays(self.segment.state())

    def _turn_restarted(self) -> None:
        # The server rolled the turn back: its losses no longer count.
        del self.losses[self._turn_start :]

    def run(self) -> dict:
        """Trains this client's turn of every epoch; returns its summary."""
        if self.client_id == self.info.num_clients - 1 and self.test is None:
            raise ValueError(
                "the last client of a round evaluates every epoch: pass test="
            )
        started = time.monotonic()
        self.run_turns(self.info.epochs)
        return {
            **self.connection_summary(),
            "losses": [loss for _, loss in self.losses],
            "wall_seconds": time.monotonic() - started,
        }

    def _train_steps(self, epoch: int, skip: int):
        """The turn's steps on the shard (one yield each)."""
        self._turn_start = len(self.losses)
        spec = self.spec
        for x, y in batches(
            *self.shard, spec.batch_size, spec.seed, epoch, self.client_id
        ):
            yield self.train_step(x, y)

    def _evaluate(self) -> dict:
        """Sends the test split; the server holds the figures (nothing to
        report from here)."""
        self.evaluate()
        return {}

    def connection_summary(self) -> dict:
        """This client's id, steps, bytes sent and received, retries, restarts."""
        return {
            "client_id": self.client_id,
            "steps": self.steps,
            "bytes_sent": self.connection.bytes_sent,
            "bytes_received": self.connection.bytes_received,
            "retries": self.connection.retries,
            "restarted_turns": self.restarts,
        }

    def close(self) -> None:
        self.connection.close()
