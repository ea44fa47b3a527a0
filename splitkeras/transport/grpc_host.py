"""One generic host: the hosted parties of any schedule behind gRPC.

`GrpcHost` serves the two calls of `wire.proto` for the parties it hosts
(the server and its coordinator, an averager, a relay, a task head, a
client's inbox, ...), each addressed by name (`Envelope.to`):

- `Join`: a client learns the run (clients, rounds, codecs, where it is).
- `Exchange`: one protocol message, steps and orchestration alike, answered
  by the party's `handle` exactly as in one process.

Every call is authenticated (client id + token metadata; a body that speaks
for another client is refused), every message is checked before it is used
(`transport.arrival`: INVALID_ARGUMENT naming the problem, and nothing
changes), and every training step is applied exactly once: a repeated step
id is answered from a cache. A party that cannot answer yet (another
client's turn, a barrier) makes the call wait a little (WAIT answers are
long-polled; `NotYet` is retried until `gather_seconds`, then UNAVAILABLE,
which clients retry). The host commits (checkpoints every hosted party and
the coordinator) when the coordinator ends a transaction, and rolls back to
the last commit when a transaction cannot finish.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time

import grpc
import tensorflow as tf

from splitkeras.checkpointing import restore_fitting
from splitkeras.protocol import DATA_KINDS, Kind, Message, NotYet, Rejected, Status
from splitkeras.transport import mirror as mirror_lib
from splitkeras.transport import wire
from splitkeras.transport.arrival import decode_message, encode_reply
from splitkeras.transport.callers import Refused, authenticate, certificate_names
from splitkeras.transport.codec import get_codec
from splitkeras.transport.counters import CATEGORIES, ByteCounters, category
from splitkeras.transport.grpc_client import FRAME_BYTES, SERVICE, channel_options
from splitkeras.transport.host_steps import HostSteps
from splitkeras.transport.proto import wire_pb2
from splitkeras.transport.replies import TRAINING, Replies

log = logging.getLogger("splitkeras")

# The longest refusal text sent back: a status travels in the reply's
# trailing metadata, which gRPC limits (8 KiB by default).
MAX_DETAILS = 1000

__all__ = ["GrpcHost", "start_host"]

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "restart": grpc.StatusCode.FAILED_PRECONDITION,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
}


class GrpcHost:
    """Hosted parties of a schedule serving K clients over gRPC.

    Args:
      parties: {name: party}, each with `handle(message)`; the first is the
        one an envelope without `to` goes to. A party may also have
        `check(message)` (refuse a step the run is not at), `tick()`,
        `rolled_back()`, `arrival_specs(kind, client)`, `takes_labels`,
        `num_classes`, `output_specs()` and `compiled_kinds`.
      num_clients: K (client ids 0..K-1).
      tokens: {client id: token}, or None to accept any client id < K
        without a token (only for trusted networks and tests).
      codec_up / codec_down: the codecs of activations / gradients.
      weight_codec: the codec of weights and averages.
      checkpoint_dir: where the host commits; None: nothing to commit (an
        inference-only host).
      state: {name: trackable} of everything committed (the parties' and
        the coordinator's variables).
      info: what Join tells besides the parties': {"run", "schedule",
        "epochs"}.
      coordinator: the party whose position Join reports (and whose
        `on_commit` / `on_rollback` the host serves), or None.
      wait_seconds: how long a WAIT answer is held back before it is sent
        (the client then asks again).
      gather_seconds: how long a message a party cannot answer yet waits
        for the others before the call fails with UNAVAILABLE (retried).
      run_eagerly / jit_compile: how the parties' steps are compiled.
      keep: training replies kept per party and client for repeated calls
        (micro-batches x steps a client may have in flight).
    """

    def __init__(
        self,
        parties: dict,
        num_clients: int,
        tokens: dict | None = None,
        codec_up="float32",
        codec_down="float32",
        weight_codec="float32",
        checkpoint_dir: str | None = None,
        state: dict | None = None,
        info: dict | None = None,
        coordinator=None,
        wait_seconds: float = 2.0,
        gather_seconds: float = 10.0,
        run_eagerly: bool = False,
        jit_compile: bool = False,
        keep: int = 1,
    ):
        self.parties = dict(parties)
        self.default = next(iter(self.parties))
        self.num_clients = num_clients
        self.tokens = tokens
        self.codecs_in = (get_codec(codec_up), get_codec(weight_codec))
        self.codecs_out = (get_codec(codec_down), get_codec(weight_codec))
        self.info = dict(info or {})
        self.coordinator = coordinator
        self.wait_seconds = wait_seconds
        self.gather_seconds = gather_seconds
        self.refused = 0
        self.applied = 0  # training messages applied
        self.on_applied = None  # called with `applied` (and what) after each
        self.hosts_told = set()  # hosts (relays) told that the run is over
        self.closed = threading.Event()  # set: the watchdog stops
        self.counters = ByteCounters.for_categories(CATEGORIES, num_clients)
        self._uncounted = {}  # (counter, client) -> bytes not yet in counters
        # Counting takes a lock of its own: a reply must not wait for the
        # host lock, which the next message holds while it computes.
        self._counts_lock = threading.Lock()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.replies = Replies(keep)
        self.rollbacks = 0  # a call waiting since before a rollback gives up
        self.waits = 0  # messages that had to wait (NotYet) for others
        self.steps = HostSteps(self.parties, run_eagerly, jit_compile)
        self.mirror = None  # a multi-worker server's chief: `mirror_to`
        self._manager = None
        if checkpoint_dir is not None:
            self._commits = tf.Variable(0, dtype=tf.int64, trainable=False)
            checkpoint = tf.train.Checkpoint(
                **(state or {}), commits=self._commits, **self._counter_state()
            )
            self._manager = tf.train.CheckpointManager(
                checkpoint, checkpoint_dir, max_to_keep=3
            )
            if coordinator is not None:
                coordinator.on_commit = self.commit
                coordinator.on_rollback = self._rollback_from_party
            if self._manager.latest_checkpoint:
                self._restore()
                log.info("Host resumed at %s", self.position())
            else:
                self.commit()

    def mirror_to(self, mirror) -> None:
        """Streams this host's steps, commits and rollbacks to the other
        workers of a multi-worker server (`mirror`: a `mirror.Mirror`)."""
        self.mirror = mirror
        self.steps.mirror = mirror.call

    @property
    def commits(self) -> int:
        """Commits made so far (this run's and, resumed, those before)."""
        return int(self._commits.numpy()) if self._manager is not None else 0

    def _counter_state(self) -> dict:
        return {f"bytes_{k}": v for k, v in self.counters.variables().items()}

    # ----------------------------------------------------------- state
    def position(self) -> tuple:
        """The coordinator's position and the steps applied, e.g. (epoch,
        turn, step) of a round robin."""
        if self.coordinator is None:
            return ()
        return (*self.coordinator.position(), int(self.coordinator.step.numpy()))

    @property
    def done(self) -> bool:
        return self.coordinator is not None and self.coordinator.done

    def commit(self) -> None:
        """Saves every hosted party's state (the end of a transaction)."""
        if self._manager is None:
            return
        with self._changed:
            self._flush_counts()
            if self.mirror is not None:
                self.mirror.publish(mirror_lib.pack(mirror_lib.COMMIT))
            self._commits.assign_add(1)
            self._manager.save(checkpoint_number=int(self._commits.numpy()))
            self._changed.notify_all()

    def _restore(self):
        restore_fitting(self._manager.checkpoint, self._manager.latest_checkpoint)

    def _rollback_from_party(self) -> None:
        self.rollback("a transaction could not finish")

    def rollback(self, why: str) -> None:
        """Back to the last commit: the start of the current transaction."""
        log.warning("Rolling back to the last commit: %s", why)
        if self._manager is not None:
            with self._lock:
                if self.mirror is not None:
                    self.mirror.publish(mirror_lib.pack(mirror_lib.ROLLBACK))
                with self._counts_lock:  # the counters go back to the commit too
                    self._uncounted = {}
                self._restore()
        self.steps.rolled_back()
        self.replies.clear()
        with self._changed:
            self.rollbacks += 1
            self._changed.notify_all()

    def tick(self) -> None:
        """Periodic checks of the parties (turn timeouts)."""
        with self._changed:
            for party in self.parties.values():
                tick = getattr(party, "tick", None)
                if tick is not None:
                    tick()

    def byte_counts(self) -> dict:
        """{name: [bytes per client]} as sent, gRPC framing included."""
        self._flush_counts()
        return self.counters.as_dict()

    # ------------------------------------------------------------ calls
    def _authenticate(self, context, claimed: int) -> int:
        metadata = dict(context.invocation_metadata())
        names = certificate_names(context)
        return authenticate(metadata, claimed, self.num_clients, self.tokens, names)

    def handlers(self) -> tuple:
        """The gRPC handlers (bytes in, bytes out) of this host."""
        service = grpc.method_handlers_generic_handler(
            SERVICE.strip("/").rstrip("/"),
            {
                name: grpc.unary_unary_rpc_method_handler(self._serve(name))
                for name in ("Join", "Exchange")
            },
        )
        if self.mirror is None:
            return (service,)
        hello = mirror_lib.pack(mirror_lib.HELLO, commits=self.commits)
        return service, self.mirror.handler(hello)

    def _serve(self, name):
        def serve(data, context):
            client, kind = None, None
            try:
                if name == "Exchange":  # a frame, or a plain envelope
                    request, payloads = wire.open_body(data, "Exchange request")
                    kind = request.kind
                    client = self._authenticate(context, request.client_id)
                    reply = self.exchange(
                        client,
                        request,
                        payloads,
                        data[:1] == b"\x00",
                        context=context,
                    )
                else:
                    request = wire.parse(wire_pb2.JoinRequest, data, "Join request")
                    client = self._authenticate(context, request.client_id)
                    reply = self.join(client, request).SerializeToString()
            except wire.WireError as e:
                self._refuse(context, name, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Refused as e:
                self._refuse(context, name, e.code, e.details)
            except Rejected as e:
                self._refuse(context, name, _CODES[e.reason], e.details)
            except Exception as e:  # a bug or an op error: say so, keep serving
                log.exception("%s failed", name)
                self._refuse(context, name, grpc.StatusCode.INTERNAL, repr(e))
            if name == "Exchange":
                self._count(client, kind, len(data), len(reply))
            return reply

        return serve

    def _count(self, client, kind, sent, received):
        if client is None:
            return
        try:
            names = CATEGORIES[category(kind)]
        except ValueError:
            return
        with self._counts_lock:  # into the counters at the next commit or read
            for name, n in ((names[0], sent), (names[1], received)):
                key = (name, client)
                self._uncounted[key] = self._uncounted.get(key, 0) + n + FRAME_BYTES

    def _flush_counts(self) -> None:
        with self._lock:  # a commit or a rollback does not come in between
            with self._counts_lock:
                uncounted, self._uncounted = self._uncounted, {}
            for (name, client), n in uncounted.items():
                self.counters.add(name, client, n)

    def _refuse(self, context, name, code, details):
        with self._counts_lock:
            self.refused += 1
        # The status travels in a header: ASCII, and not too long.
        details = details.encode("ascii", "backslashreplace").decode("ascii")
        if len(details) > MAX_DETAILS:
            details = f"{details[:MAX_DETAILS]}... ({len(details)} characters)"
        log.info("%s refused: %s: %s", name, code.name, details)
        context.abort(code, details)

    def _party(self, name: str):
        name = name or self.default
        if name not in self.parties:
            raise wire.WireError(
                f"this host serves {', '.join(sorted(self.parties))}, not {name!r}"
            )
        return name, self.parties[name]

    def join(self, client, request) -> wire_pb2.JoinReply:
        name, party = self._party(request.to)
        expected = self.info.get("schedule", "")
        if request.schedule and expected and request.schedule != expected:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this host runs {expected!r}, the client {request.schedule!r}: "
                "start both from the same config",
            )
        mine = self.info.get("config")
        if request.config and mine is not None:
            try:
                theirs = json.loads(request.config)
            except ValueError:
                theirs = None
            if not isinstance(theirs, dict):
                raise wire.WireError("the Join request's config is not a JSON object")
            differences = config_differences(mine, theirs)
            if differences:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"client {client}'s config differs from this host's: "
                    f"{'; '.join(differences)}: start both from the same config",
                )
        with self._lock:
            position = self.position()
            if request.host and self.done:
                self.hosts_told.add(request.host)
        specs = getattr(party, "output_specs", lambda: [])()
        return wire_pb2.JoinReply(
            run=self.info.get("run", ""),
            num_clients=self.num_clients,
            epoch=position[0] if position else 0,
            turn=position[1] if len(position) > 2 else 0,
            epochs=int(self.info.get("epochs", 0)),
            done=self.done,
            output_dtypes=[tf.as_dtype(d).name for d, _ in specs],
            codec_up=self.codecs_in[0].name,
            codec_down=self.codecs_out[0].name,
            schedule=expected,
            parties=sorted(self.parties),
        )

    def exchange(
        self, client, envelope, payloads=None, framed=False, context=None
    ) -> bytes:
        """Answers one message; returns the serialized reply.

        `context`: the call's gRPC context, or None. When its caller has gone
        (cancelled the call, or its process ended) a step it sent is not
        applied; a step that waits for the ones before it (micro-batches,
        steps sent ahead) waits until the call's deadline.
        """
        payloads = payloads or wire.Payloads()
        with self._changed:
            name, party = self._party(envelope.to)
            seen = getattr(party, "seen", None)
            if seen is not None:
                seen(client)
            cached = self.replies.cached(name, client, envelope)
            if cached is not None:
                return cached
            kind = Kind(envelope.kind) if envelope.kind in set(Kind) else None
            if kind == Kind.EVALUATE:
                self._check_evaluation(name, client, envelope)
            specs = None
            if kind == Kind.OUTPUT_GRADIENTS:
                specs = self.replies.open_specs(name, client)
                if specs is None:
                    raise wire.WireError(
                        f"OUTPUT_GRADIENTS of step {envelope.step} from client "
                        f"{client} without a TRAIN message before it"
                    )
            message = decode_message(
                envelope, party, client, payloads, self.codecs_in, specs
            )
            reply = self._answer(name, party, message, context)
            data = encode_reply(envelope, reply, self.codecs_out, framed)
            self.replies.remember(name, client, envelope, reply, data)
            self._changed.notify_all()
            if kind in TRAINING:
                self.applied += 1
                if self.on_applied is not None:
                    last = f"{kind.name} of client {client}, step {envelope.step}"
                    self.on_applied(self.applied, last)
            return data

    def _check_evaluation(self, name, client, envelope):
        expected = self.replies.next_evaluation(name, client)
        if envelope.step not in (1, expected):
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"evaluation batch {envelope.step} of client {client} is out "
                f"of order (expected 1 or {expected})",
            )

    def _ready(self, name, message, context, rollbacks) -> None:
        """Raises unless `message` can be answered now (NotYet: wait)."""
        if context is not None and not context.is_active():
            raise Refused(
                grpc.StatusCode.CANCELLED,
                f"client {message.client_id} cancelled its {message.kind.name} "
                f"of step {message.step} (row {message.offset})",
            )
        if message.kind in TRAINING and self.rollbacks != rollbacks:
            # A step sent ahead of one that was rolled back: not applied.
            raise Rejected(
                "restart",
                f"the host rolled back while step {message.step} of client "
                f"{message.client_id} waited: begin again",
            )
        if message.kind == Kind.TRAIN and message.rows:
            expected = self.replies.next_offset(name, message.client_id, message.step)
            rows = self.replies.step_rows(name, message.client_id, message.step)
            if rows not in (None, message.rows):
                raise wire.WireError(
                    f"a micro-batch of step {message.step} says the step has "
                    f"{message.rows} rows, its first said {rows}"
                )
            if message.offset > expected:
                raise NotYet(
                    f"the micro-batch at row {message.offset} of step "
                    f"{message.step} waits for the one at row {expected}"
                )
            if message.offset < expected:
                raise Rejected(
                    "restart",
                    f"micro-batch at row {message.offset} of step {message.step} "
                    f"is out of order (expected row {expected})",
                )

    def _answer(self, name, party, message, context=None) -> Message:
        """The party's reply; waits while it cannot answer yet."""
        deadline = time.monotonic() + self.gather_seconds
        remaining = getattr(context, "time_remaining", lambda: None)()
        if message.kind in TRAINING and remaining is not None:
            # A step waits for those before it as long as its caller waits.
            deadline = max(deadline, time.monotonic() + remaining - 1.0)
        wait_until = time.monotonic() + self.wait_seconds
        check = getattr(party, "check", None) if message.kind in DATA_KINDS else None
        rollbacks, waited = self.rollbacks, False
        while True:
            try:
                self._ready(name, message, context, rollbacks)
                if check is not None:  # the coordinator: is the run there?
                    check(
                        Message(
                            message.kind,
                            message.client_id,
                            message.step,
                            offset=message.offset,
                            rows=message.rows,
                        )
                    )
                reply = self.steps.handle(name, party, message)
            except NotYet as e:
                if not waited:
                    waited = True
                    self.waits += 1
                if time.monotonic() > deadline:
                    raise Refused(
                        grpc.StatusCode.UNAVAILABLE, f"still waiting: {e}"
                    ) from None
                self._changed.wait(0.2)
                continue
            except (Rejected, Refused, wire.WireError):
                raise
            except Exception as e:
                if message.kind in TRAINING:
                    # A step may have changed some state before failing: back
                    # to the last commit; the client trains its part again.
                    log.exception(
                        "training message of client %d failed", message.client_id
                    )
                    self.rollback(f"a training message failed: {e!r}")
                    raise Refused(grpc.StatusCode.INTERNAL, repr(e)) from None
                raise
            if reply.status != Status.WAIT or time.monotonic() > wait_until:
                return reply
            self._changed.wait(min(0.5, max(0.0, wait_until - time.monotonic())))


def config_differences(mine: dict, theirs: dict) -> list:
    """'field=theirs (here mine)' for each config field whose values differ
    (`deployment.config_fingerprint` on each side)."""
    return [
        f"{field}={theirs.get(field)!s} (here {mine.get(field)!s})"
        for field in sorted(set(mine) | set(theirs))
        if mine.get(field) != theirs.get(field)
    ]


def start_host(
    host: GrpcHost,
    address: str,
    credentials=None,
    max_message_bytes: int = 64 << 20,
    workers: int | None = None,
):
    """Starts a gRPC server for `host` at `address`; returns (server, port)."""
    workers = workers or max(8, 2 * host.num_clients + 4)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers),
        # No SO_REUSEPORT: a second server on a port in use fails to bind
        # instead of sharing (and splitting) the clients' calls.
        options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers(host.handlers())
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(
            f"could not bind the server to {address}: is another server "
            "listening there?"
        )
    server.start()

    def watchdog():
        while not host.closed.wait(1.0):
            host.tick()

    threading.Thread(target=watchdog, daemon=True, name="host-watchdog").start()
    return server, port
