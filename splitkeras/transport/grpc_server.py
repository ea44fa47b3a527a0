"""The server side of the gRPC transport: a `Server` party behind gRPC.

`SplitService` answers the four calls of `wire.proto`:

- `Join`: a client learns the run (clients, epochs, codecs, whose turn).
- `BeginTurn` / `EndTurn`: round-robin turns. The server stores the sealed
  client state one client hands to the next (it has no key to open it) and
  checkpoints itself at the end of every turn: a turn is a transaction.
- `Exchange`: one protocol message (TRAIN, OUTPUT_GRADIENTS, EVALUATE,
  PREDICT), answered by `Server.handle` exactly as in-process.

Every call is authenticated (client id + token metadata; a body that speaks
for another client is refused), every message is checked before it is used
(shape, dtype, codec, step id, finiteness: INVALID_ARGUMENT naming the
problem, and nothing changes), and every training step is applied exactly
once: a repeated step id is answered from a cache. When a turn must start
over (the server restarted from its checkpoint, the client came back after a
crash, or the client went silent for `turn_timeout` seconds and its turn was
skipped) the server restores its last checkpoint, the start of that turn, and
refuses the old steps with FAILED_PRECONDITION.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import logging
import os
import threading
import time

import grpc
import numpy as np
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.parties.segment_step import compiled, wire_dtype
from splitkeras.protocol import Kind, Message
from splitkeras.transport import wire
from splitkeras.transport.codec import get_codec
from splitkeras.transport.grpc_client import FRAME_BYTES, SERVICE, channel_options
from splitkeras.transport.proto import wire_pb2

log = logging.getLogger("splitkeras")

__all__ = ["Refused", "SplitService", "start_server"]


class Refused(Exception):
    """A call is refused with `code` (a grpc.StatusCode) and `details`."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(details):
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, details)


def _restart(details):
    return Refused(grpc.StatusCode.FAILED_PRECONDITION, details)


class _Turns:
    """Round-robin position and the handed-on state, as checkpointable variables."""

    def __init__(self, num_clients):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.turn = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.state = tf.Variable(b"", dtype=tf.string, trainable=False)
        self.wall_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)

        def counters():
            return [
                tf.Variable(0, dtype=tf.int64, trainable=False)
                for _ in range(num_clients)
            ]

        self.bytes_up = counters()
        self.bytes_down = counters()
        self.handoff_up = counters()
        self.handoff_down = counters()
        # The last epoch in which each client ended its turn (-1: none), so
        # that only a retry of an applied EndTurn is answered as success.
        self.ended = [
            tf.Variable(-1, dtype=tf.int64, trainable=False) for _ in range(num_clients)
        ]

    def trackables(self) -> dict:
        named = {
            "epoch": self.epoch,
            "turn": self.turn,
            "step": self.step,
            "state": self.state,
            "wall_seconds": self.wall_seconds,
        }
        for name in ("bytes_up", "bytes_down", "handoff_up", "handoff_down", "ended"):
            for k, v in enumerate(getattr(self, name)):
                named[f"{name}_{k}"] = v
        return named


class SplitService:
    """A `Server` party serving K round-robin clients over gRPC.

    Args:
      server: the `Server` party (segment, optimizer, objective if vanilla).
      num_clients: K.
      epochs: epochs to train.
      checkpoint_dir: where the server checkpoints (one per turn end); None
        for a service that only answers PREDICT (epochs=0, nothing to save).
      tokens: {client id: token}, or None to accept any client id < K
        without a token (only for trusted networks and tests).
      codec_up / codec_down: the codecs of activations / gradients.
      turn_timeout: seconds of silence from the client whose turn it is
        before its turn is skipped (rolled back; the next client goes on).
      on_epoch_end: called as `on_epoch_end(epoch, train_logs, val_logs)`
        after each epoch's last turn, before the checkpoint.
      on_turn_begin: called as `on_turn_begin(epoch)` when a client's turn
        begins (e.g. to set the epoch's learning rate).
      run_eagerly: do not compile the server's steps.
      jit_compile: compile them with XLA.
    """

    def __init__(
        self,
        server,
        num_clients: int,
        epochs: int,
        checkpoint_dir: str,
        tokens: dict | None = None,
        codec_up="float32",
        codec_down="float32",
        turn_timeout: float = 600.0,
        on_epoch_end=None,
        run_eagerly: bool = False,
        jit_compile: bool = False,
        on_turn_begin=None,
    ):
        self.server = server
        self.num_clients = num_clients
        self.epochs = epochs
        self.tokens = tokens
        self.codec_up = get_codec(codec_up)
        self.codec_down = get_codec(codec_down)
        self.turn_timeout = turn_timeout
        self.on_epoch_end = on_epoch_end
        self.on_turn_begin = on_turn_begin
        self.turns = _Turns(num_clients)
        self.skipped = []  # (epoch, client) of turns skipped after a timeout
        self.refused = 0
        self.closed = threading.Event()  # set: the watchdog stops
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._active = None  # client id training its turn, or None
        self._last_seen = None  # the silence clock starts with the first call
        self._cache = {}  # client id -> (step, kind, reply bytes)
        self._payloads, self._framed = wire.Payloads(), False  # current body
        self._open_specs = {}  # client id -> U-shaped outputs awaiting gradients
        self._eval_step = {}  # client id -> last evaluation batch applied
        self._client_logs = {}  # epoch logs reported by clients at EndTurn
        self._started = time.monotonic() - float(self.turns.wall_seconds.numpy())
        self._inputs = _specs(server.segment.inputs)
        self._outputs = _specs(server.segment.outputs)
        self._compile(run_eagerly, jit_compile)
        self._manager = None
        if checkpoint_dir is None:  # inference only: nothing to checkpoint
            return
        self._manager = tf.train.CheckpointManager(
            party_checkpoint(
                [server.segment], server.optimizer, **self.turns.trackables()
            ),
            checkpoint_dir,
            max_to_keep=2,
        )
        if self._manager.latest_checkpoint:
            self._restore()
            log.info(
                "Server resumed at epoch %d, turn %d, step %d",
                *self.position(),
            )
        else:
            self._save()

    # ----------------------------------------------------------- state
    def position(self) -> tuple[int, int, int]:
        t = self.turns
        return int(t.epoch.numpy()), int(t.turn.numpy()), int(t.step.numpy())

    @property
    def done(self) -> bool:
        return self.position()[0] >= self.epochs

    def _save(self):
        self.turns.wall_seconds.assign(time.monotonic() - self._started)
        epoch, turn, _ = self.position()
        self._manager.save(checkpoint_number=epoch * self.num_clients + turn)

    def _restore(self):
        self._manager.checkpoint.restore(
            self._manager.latest_checkpoint
        ).assert_existing_objects_matched()
        self._started = time.monotonic() - float(self.turns.wall_seconds.numpy())

    def _rollback(self, why: str):
        """Back to the start of the current turn (the last checkpoint)."""
        log.warning("Rolling back to the start of the turn: %s", why)
        self._restore()
        self.server._open_steps.clear()
        self._open_specs.clear()
        self._cache.clear()
        self._active = None

    # ------------------------------------------------------ compiled steps
    def _compile(self, run_eagerly, jit_compile=False):
        def wrap(f):
            return compiled(f, run_eagerly, jit_compile)

        server = self.server

        def train(tensors, labels, sample_weight):
            reply = server.handle(
                Message(Kind.TRAIN, 0, 0, tuple(tensors), labels, sample_weight)
            )
            return list(reply.tensors), reply.loss

        def infer(kind, tensors, labels, sample_weight):
            reply = server.handle(
                Message(kind, 0, 0, tuple(tensors), labels, sample_weight)
            )
            loss = reply.loss if reply.loss is not None else tf.constant(np.nan)
            return list(reply.tensors), loss

        self._train = wrap(train)
        self._evaluate = wrap(lambda t, y, w: infer(Kind.EVALUATE, t, y, w))
        self._predict = wrap(lambda t: infer(Kind.PREDICT, t, None, None))

    # ------------------------------------------------------------ calls
    def _authenticate(self, context, claimed: int) -> int:
        metadata = dict(context.invocation_metadata())
        raw = metadata.get("x-splitkeras-client", "")
        try:
            client = int(raw)
        except ValueError:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing or malformed client id metadata {raw!r}",
            ) from None
        if not 0 <= client < self.num_clients:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"unknown client {client}: this server serves clients "
                f"0..{self.num_clients - 1}",
            )
        if self.tokens is not None:
            token = metadata.get("x-splitkeras-token", "")
            if not hmac.compare_digest(token.encode(), self.tokens[client].encode()):
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED, f"wrong token for client {client}"
                )
        if claimed != client:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client} cannot speak for client {claimed}",
            )
        return client

    def handlers(self) -> grpc.GenericRpcHandler:
        """The gRPC handlers (bytes in, bytes out) of this service."""
        calls = {
            "Join": (wire_pb2.JoinRequest, self.join),
            "BeginTurn": (wire_pb2.TurnRequest, self.begin_turn),
            "Exchange": (wire_pb2.Envelope, self.exchange),
            "EndTurn": (wire_pb2.TurnEnd, self.end_turn),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE.strip("/").rstrip("/"),
            {
                name: grpc.unary_unary_rpc_method_handler(self._serve(name, *call))
                for name, call in calls.items()
            },
        )

    def _serve(self, name, request_type, method):
        def serve(data, context):
            try:
                if name == "Exchange":  # a frame, or a plain envelope
                    request, payloads = wire.open_body(data, "Exchange request")
                    body = (payloads, data[:1] == b"\x00")
                else:
                    request = wire.parse(request_type, data, f"{name} request")
                    body = None
                client = self._authenticate(context, request.client_id)
                with self._lock:
                    if self._last_seen is None:
                        self._last_seen = time.monotonic()
                args = () if body is None else body
                reply = method(client, request, *args)
                if not isinstance(reply, bytes):
                    reply = reply.SerializeToString()
            except wire.WireError as e:
                self._refuse(context, name, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Refused as e:
                self._refuse(context, name, e.code, e.details)
            except Exception as e:  # a bug or an op error: say so, keep serving
                log.exception("%s failed", name)
                self._refuse(context, name, grpc.StatusCode.INTERNAL, repr(e))
            if name == "Exchange":
                with self._lock:
                    self.turns.bytes_up[client].assign_add(len(data) + FRAME_BYTES)
                    self.turns.bytes_down[client].assign_add(len(reply) + FRAME_BYTES)
            return reply

        return serve

    def _refuse(self, context, name, code, details):
        with self._lock:
            self.refused += 1
        log.info("%s refused: %s: %s", name, code.name, details)
        context.abort(code, details)

    def join(self, client, request):
        with self._lock:  # epoch and turn change together under the lock
            epoch, turn, _ = self.position()
        return wire_pb2.JoinReply(
            run=os.path.basename(os.path.dirname(self._manager.directory))
            if self._manager is not None
            else "predictions",
            num_clients=self.num_clients,
            epoch=epoch,
            turn=turn,
            epochs=self.epochs,
            done=self.done,
            output_dtypes=[d.name for d, _ in self._outputs],
            codec_up=self.codec_up.name,
            codec_down=self.codec_down.name,
        )

    def begin_turn(self, client, request, wait: float = 2.0):
        with self._changed:
            deadline = time.monotonic() + wait
            while True:
                self._check_timeout()
                epoch, turn, step = self.position()
                if self.done:
                    return wire_pb2.TurnReply(done=True, epoch=epoch, turn=turn)
                if (epoch, turn) == (request.epoch, client):
                    break
                if (request.epoch, client) < (epoch, turn):
                    # That turn is over (trained, or skipped): go on.
                    return wire_pb2.TurnReply(ready=False, epoch=epoch, turn=turn)
                left = deadline - time.monotonic()
                if left <= 0:
                    return wire_pb2.TurnReply(ready=False, epoch=epoch, turn=turn)
                self._changed.wait(min(left, 0.5))
            if self._active == client:
                self._rollback(f"client {client} began its turn again")
                epoch, turn, step = self.position()
            self._active = client
            self._last_seen = time.monotonic()
            self._eval_step.pop(client, None)
            self._cache.pop(("eval", client), None)
            if turn == 0 and self.server.objective is not None:
                self.server.objective.reset(training=True)
            if self.on_turn_begin is not None:
                self.on_turn_begin(epoch)
            state = self.turns.state.numpy()
            self.turns.handoff_down[client].assign_add(len(state))
            return wire_pb2.TurnReply(ready=True, step=step, state=state, epoch=epoch)

    def tick(self):
        """Checks for a silent client (called periodically by the server)."""
        with self._changed:
            if not self.done:
                self._check_timeout()

    def _check_timeout(self):
        """Skips the turn of a client silent for `turn_timeout` seconds."""
        if self._last_seen is None:
            return
        if time.monotonic() - self._last_seen <= self.turn_timeout:
            return
        epoch, turn, _ = self.position()
        if self._active is not None:
            self._rollback(f"client {turn} silent for {self.turn_timeout:.0f} s")
        log.warning("Skipping client %d's turn of epoch %d", turn, epoch)
        self.skipped.append({"epoch": epoch, "client": turn})
        self._advance(epoch, turn, {})

    def exchange(self, client, envelope, payloads=None, framed=False):
        """Answers one protocol message; returns the serialized reply.

        `payloads` holds the out-of-line array bytes of a framed body; the
        reply is framed the same way when the request was.
        """
        with self._lock:
            self._payloads = payloads or wire.Payloads()
            self._framed = framed
            if self._active == client:
                self._last_seen = time.monotonic()
            try:
                return self._dispatch(client, envelope)
            finally:
                self._payloads = wire.Payloads()  # do not keep the request's bytes

    def _dispatch(self, client, envelope):
        kind = envelope.kind
        if kind in (Kind.TRAIN, Kind.OUTPUT_GRADIENTS):
            try:
                return self._train_message(client, envelope)
            except (Refused, wire.WireError):
                raise
            except Exception as e:
                # A step may have changed some state before failing: back to
                # the start of the turn, which the client then trains again.
                log.exception("training message of client %d failed", client)
                self._rollback(f"a training message failed: {e!r}")
                raise Refused(grpc.StatusCode.INTERNAL, repr(e)) from None
        if kind == Kind.EVALUATE:
            return self._evaluate_message(client, envelope)
        if kind == Kind.PREDICT:
            tensors, _, _ = self._arrival(envelope, self._inputs, labels=False)
            outputs, _ = self._predict(tensors)
            return self._envelope(envelope, Kind.SERVER_OUTPUT, outputs)
        raise _invalid(
            f"a client cannot send a {wire.kind_name(kind)} message to the server"
        )

    def _train_message(self, client, envelope):
        epoch, turn, step = self.position()
        if self._active != client:
            raise _restart(
                f"client {client} is not training a turn (the server is at epoch "
                f"{epoch}, turn {turn}): begin the turn"
            )
        self._last_seen = time.monotonic()
        cached = self._cache.get(client)
        if cached and cached[:2] == (envelope.step, envelope.kind):
            return cached[2]
        if envelope.step != step + 1:
            raise _restart(
                f"step {envelope.step} of client {client} is out of order: the "
                f"server has applied {step} steps and expects step {step + 1} "
                "(the turn restarted: begin it again)"
            )
        if envelope.kind == Kind.OUTPUT_GRADIENTS:
            reply = self._output_gradients(client, envelope)
        elif self.server.holds_labels:
            tensors, labels, weights = self._arrival(envelope, self._inputs, True)
            grads, loss = self._train(tensors, labels, weights)
            reply = self._envelope(envelope, Kind.GRADIENTS, grads, loss)
            self.turns.step.assign_add(1)
        else:
            tensors, _, _ = self._arrival(envelope, self._inputs, labels=False)
            if client in self.server._open_steps:
                raise _restart(f"client {client} sent TRAIN twice for one step")
            answer = self.server.handle(
                Message(Kind.TRAIN, client, envelope.step, tuple(tensors))
            )
            # Their gradients must come back with exactly these shapes.
            self._open_specs[client] = [
                (t.dtype, list(t.shape)) for t in answer.tensors
            ]
            reply = self._envelope(envelope, Kind.SERVER_OUTPUT, answer.tensors)
        self._cache[client] = (envelope.step, envelope.kind, reply)
        return reply

    def _output_gradients(self, client, envelope):
        if client not in self.server._open_steps:
            raise _invalid(
                f"OUTPUT_GRADIENTS of step {envelope.step} from client {client} "
                "without a TRAIN message before it"
            )
        specs = self._open_specs[client]
        tensors, _, _ = self._arrival(envelope, specs, labels=False)
        answer = self.server.handle(
            Message(Kind.OUTPUT_GRADIENTS, client, envelope.step, tuple(tensors))
        )
        self.turns.step.assign_add(1)
        return self._envelope(envelope, Kind.GRADIENTS, answer.tensors)

    def _evaluate_message(self, client, envelope):
        labels = self.server.holds_labels
        last = self._eval_step.get(client, 0)
        cached = self._cache.get(("eval", client))
        if cached and cached[0] == envelope.step:
            return cached[2]
        if envelope.step not in (1, last + 1):
            raise _restart(
                f"evaluation batch {envelope.step} of client {client} is out of "
                f"order (expected 1 or {last + 1})"
            )
        tensors, y, w = self._arrival(envelope, self._inputs, labels)
        if envelope.step == 1 and labels:
            self.server.objective.reset(training=False)
        if labels:
            _, loss = self._evaluate(tensors, y, w)
            reply = self._envelope(envelope, Kind.ACK, [], loss)
        else:
            outputs, _ = self._predict(tensors)
            reply = self._envelope(envelope, Kind.SERVER_OUTPUT, outputs)
        self._eval_step[client] = envelope.step
        self._cache[("eval", client)] = (envelope.step, 0, reply)
        return reply

    def _arrival(self, envelope, specs, labels: bool):
        """Checked, decoded tensors (and labels) of an arriving envelope."""
        if envelope.step < 1:
            raise _invalid(f"step id must be >= 1, got {envelope.step}")
        if len(envelope.tensors) != len(specs):
            raise _invalid(
                f"{wire.kind_name(envelope.kind)} carries {len(envelope.tensors)} "
                f"tensors, the server expects {len(specs)}"
            )
        tensors = []
        for i, (encoded, (dtype, shape)) in enumerate(zip(envelope.tensors, specs)):
            what = f"tensor {i}"
            parts = wire.check_encoded(
                encoded, self.codec_up, dtype, shape, what, self._payloads, i
            )
            tensors.append(wire.decode_tensor(self.codec_up, encoded, parts, what))
        batch = int(tensors[0].shape[0]) if tensors else None
        if any(int(t.shape[0]) != batch for t in tensors):
            raise _invalid("tensors disagree on the batch size")
        if batch == 0:
            raise _invalid("tensor 0 has batch size 0: nothing to train on")
        if not labels:
            if envelope.HasField("labels") or envelope.HasField("sample_weight"):
                raise _invalid(
                    "this message must not carry labels: the server holds no "
                    "loss here (U-shaped) or the message is not for training"
                )
            return tensors, None, None
        if not envelope.HasField("labels"):
            raise _invalid(
                f"{wire.kind_name(envelope.kind)} without labels, but this server "
                "holds the loss (vanilla)"
            )
        y = self._payloads.array(envelope.labels, "labels", "labels")
        self._check_labels(y, batch)
        w = None
        if envelope.HasField("sample_weight"):
            w = self._payloads.array(
                envelope.sample_weight, "sample_weight", "sample_weight"
            )
            if w.shape != (batch,) or not np.all(np.isfinite(w)):
                raise _invalid(
                    f"sample_weight must be {batch} finite values, got shape "
                    f"{list(w.shape)}"
                )
            w = tf.constant(w, tf.float32)
        # One dtype per argument, so the compiled step is traced once.
        return tensors, tf.constant(y, tf.int64), w

    def _check_labels(self, y, batch):
        """Labels must be `batch` class ids of the server's classifier output."""
        if y.shape != (batch,):
            raise _invalid(
                f"labels have shape {list(y.shape)}, expected [{batch}] (one class "
                "id per example)"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise _invalid(f"labels must be integer class ids, got {y.dtype.name}")
        classes = self._outputs[0][1][-1]
        if classes and (y.min() < 0 or y.max() >= classes):
            raise _invalid(
                f"labels must be class ids in [0, {classes}), got "
                f"[{y.min()}, {y.max()}]"
            )

    def _envelope(self, request, kind, tensors, loss=None) -> bytes:
        """The serialized reply (a frame if the request was one)."""
        reply = wire_pb2.Envelope(
            kind=int(kind), client_id=request.client_id, step=request.step
        )
        payloads = [] if self._framed else None
        for t in tensors:
            wire.encode_tensor(self.codec_down, t, reply.tensors.add(), payloads)
        if loss is not None:
            wire.fill_array(reply.loss, tf.cast(loss, tf.float32), payloads)
        if payloads is None:
            return reply.SerializeToString()
        return wire.frame(reply, payloads)

    def end_turn(self, client, request):
        with self._changed:
            epoch, turn, step = self.position()
            if (request.epoch, client) < (epoch, turn) and self._active != client:
                if int(self.turns.ended[client].numpy()) == request.epoch:
                    # A retried EndTurn whose first attempt was applied.
                    return wire_pb2.TurnEndReply(epoch=epoch, turn=turn, done=self.done)
                raise _restart(
                    f"client {client}'s turn of epoch {request.epoch} was skipped "
                    "(silent past the turn timeout); its steps were rolled back"
                )
            if self._active != client or (request.epoch, client) != (epoch, turn):
                raise _restart(
                    f"client {client} ends a turn it is not training (the server "
                    f"is at epoch {epoch}, turn {turn})"
                )
            if request.step != step or client in self.server._open_steps:
                raise _restart(
                    f"client {client} ends its turn at step {request.step}, the "
                    f"server has applied {step}: begin the turn again"
                )
            self.turns.state.assign(request.state)
            self.turns.ended[client].assign(epoch)
            self.turns.handoff_up[client].assign_add(len(request.state))
            self._advance(epoch, turn, dict(request.metrics))
            epoch, turn, _ = self.position()
            return wire_pb2.TurnEndReply(epoch=epoch, turn=turn, done=self.done)

    def _advance(self, epoch, turn, client_logs):
        """Ends (epoch, turn): epoch logs, next position, checkpoint, wake waiters."""
        self._active = None
        self._last_seen = time.monotonic()
        self._client_logs.setdefault(epoch, []).append(client_logs)
        if turn + 1 < self.num_clients:
            self.turns.turn.assign(turn + 1)
        else:
            self.turns.turn.assign(0)
            self.turns.epoch.assign(epoch + 1)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, *self._epoch_logs(epoch))
        self._save()
        self._changed.notify_all()

    def _epoch_logs(self, epoch):
        reports = [r for r in self._client_logs.pop(epoch, []) if r]
        train_reports = [
            {k[6:]: v for k, v in r.items() if k.startswith("train_")} for r in reports
        ]
        val = {}
        for r in reports:
            val.update({k[4:]: v for k, v in r.items() if k.startswith("val_")})
        objective = self.server.objective
        if objective is not None:
            train = {k: float(v) for k, v in objective.result(training=True).items()}
            val = {k: float(v) for k, v in objective.result(training=False).items()}
        else:
            train_reports = [r for r in train_reports if r]
            keys = train_reports[0].keys() if train_reports else []
            train = {
                k: float(np.mean([r[k] for r in train_reports if k in r])) for k in keys
            }
        return train, val

    def byte_counts(self) -> dict:
        t = self.turns

        def values(vs):
            return [int(v.numpy()) for v in vs]

        return {
            "bytes_up": values(t.bytes_up),
            "bytes_down": values(t.bytes_down),
            "handoff_bytes_received": values(t.handoff_up),
            "handoff_bytes_sent": values(t.handoff_down),
        }


def _specs(tensors) -> list:
    """[(dtype on the wire, shape with None batch)] of Keras tensors."""
    return [
        (wire_dtype(t.dtype), [None] + [d for d in t.shape[1:]])
        for t in tf.nest.flatten(tensors)
    ]


def start_server(
    service: SplitService,
    address: str,
    credentials=None,
    max_message_bytes: int = 64 << 20,
    workers: int | None = None,
):
    """Starts a gRPC server for `service` at `address`; returns (server, port)."""
    workers = workers or max(8, 2 * service.num_clients + 2)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers),
        options=channel_options(max_message_bytes),
    )
    server.add_generic_rpc_handlers((service.handlers(),))
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind the server to {address}")
    server.start()

    def watchdog():
        while not service.closed.wait(1.0):
            service.tick()

    threading.Thread(target=watchdog, daemon=True, name="turn-watchdog").start()
    return server, port
