"""One process of a run over gRPC: a host, or one client.

`serve(config, workdir, host=...)` runs a host of `config`'s schedule (the
server side: the parties `deployment.layout` puts on it) until every round
is trained; it reads no dataset. `run_client(config, k, connect, ...)`
runs client k: it reads its own site only (`config.data.sites`, or its part
of the dataset), builds its program and trains its part of every round
through gRPC links to the hosts. Both drive their process with the same
`Runner` as an in-process run (progress, TensorBoard, checkpoints,
summary.json), and build the same parties from the same seed as the
in-process schedule, so the final weights equal those of
`experiment.train_and_evaluate` with the same config (tested within 1e-5,
codec float32, for every configuration).

Faults: every call retries while a host is unreachable, and every step is
applied once (step ids, a reply cache). A host commits at the end of every
transaction (a turn of round robin, a round otherwise) and, restarted from
its workdir, goes back to its last commit; clients then train that turn or
round again from their state at its start (round robin: the handed-on
state; otherwise each client's own snapshot).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time

import numpy as np
import tensorflow as tf

from splitkeras import builders, client_data, deployment, distribute
from splitkeras.checkpointing import load_trained
from splitkeras.parties.handoff import state_variables
from splitkeras.parties.segment_step import wire_dtype
from splitkeras.protocol import Kind, Message, Status
from splitkeras.runner import Runner, RunnerProcess
from splitkeras.schedules import alignment
from splitkeras.transport import codec as codec_lib
from splitkeras.transport.grpc_client import Connection, ControlLink, TurnRestarted
from splitkeras.transport.grpc_host import GrpcHost, start_host
from splitkeras.transport.grpc_link import GrpcLink
from splitkeras.transport.proto import wire_pb2
from splitkeras.transport.sealing import read_key, write_key
from splitkeras.transport.turns import Inbox, TurnClient, yield_all

log = logging.getLogger("splitkeras")

__all__ = ["read_key", "run_client", "serve", "serve_predictions", "write_key"]

# Fault tests: a process started with this variable set to N kills itself
# (SIGKILL, no clean-up) right after its N-th training step: a host after
# applying its N-th training message, a client after its N-th step.
KILL_AFTER_STEPS = "SPLITKERAS_KILL_AFTER_STEPS"


def _kill_after(steps: int) -> None:
    limit = int(os.environ.get(KILL_AFTER_STEPS, "0") or 0)
    if limit and steps >= limit:
        log.warning("%s=%d: killing this process", KILL_AFTER_STEPS, limit)
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------- host
class HostProcess(RunnerProcess):
    """A gRPC host's part of the run: it waits for each round to end."""

    def __init__(self, config, host: GrpcHost, strategy=None):
        self.config = config
        self.host = host
        self.coordinator = host.coordinator
        self.strategy = strategy
        self.rounds = int(config.train.epochs)

    def start_epoch(self, saved: int) -> int:
        return self.coordinator.position()[0] if self.coordinator else 0

    def round(self, epoch, skip=0):
        """Yields once per step applied here, until round `epoch` has ended."""
        seen = int(self.coordinator.step.numpy())
        with self.host._changed:
            while int(self.coordinator.round.numpy()) <= epoch and not self.host.done:
                self.host._changed.wait(0.5)
                now = int(self.coordinator.step.numpy())
                for _ in range(now - seen):
                    yield None
                seen = now

    def logs(self, epoch):
        return self.coordinator.logs.get(epoch, ({}, {}))

    def byte_counts(self) -> dict:
        return self.host.byte_counts()

    def summary(self, test: dict) -> dict:
        from splitkeras.experiment import byte_totals, summary_fields

        per_client = self.byte_counts()
        replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
        return {
            **summary_fields(self.config, self.config.data.name, test),
            **byte_totals(per_client),
            "transport": "grpc",
            "per_client": per_client,
            "steps": int(self.coordinator.step.numpy()),
            "server_replicas": replicas,
            "skipped_turns": list(getattr(self.coordinator, "skipped", [])),
            "refused_calls": self.host.refused,
            # Peak resident memory of the host process (Linux reports KiB).
            "server_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024,
        }


def serve(
    config,
    workdir: str,
    address: str = "127.0.0.1:0",
    credentials=None,
    tokens: dict | None = None,
    on_started=None,
    host: str = "server",
    connect: dict | None = None,
    connect_credentials=None,
    token: str | None = None,
) -> dict:
    """Runs host `host` of `config`'s run until every round is trained.

    Args:
      config: the run's config (`config.grpc` for limits and timeouts).
      workdir: the host's directory: its commits (resumed from if present),
        TensorBoard, summary.json, final weights.
      address: "host:port" to listen on (port 0: any free port).
      credentials: `grpc.ServerCredentials` (TLS), or None for plaintext.
      tokens: {client id: token}; None accepts any client id (tests only).
      on_started: called with the bound port once the host listens.
      host: which host of `deployment.layout(config)` this is.
      connect: {party: "host:port"} of the parties on other hosts this one
        sends to (a relay: the server).
      connect_credentials / token: TLS and token of this host's own calls.

    Returns:
      The host's summary.
    """
    strategy = distribute.make_strategy(config.get("server", {}))  # first
    distribute.check_supported(config, strategy)
    if strategy is not None and config.server.strategy == "multi_worker":
        raise ValueError(
            "config.server.strategy='multi_worker' does not serve gRPC clients "
            "yet (the first worker does not relay their messages to the "
            "others): serve with 'mirrored' on one machine, or run multi_worker "
            "in-process with scripts/train.py on every worker"
        )
    settings = config.grpc
    links = {
        party: _relay_link(config, party, address_of, connect_credentials, token)
        for party, address_of in (connect or {}).items()
    }
    parties, coordinator, state = deployment.hosted_parties(
        config, host, links, strategy, clock=time.monotonic
    )
    up, down = builders.codecs(config)
    grpc_host = GrpcHost(
        parties,
        config.num_clients,
        tokens=tokens,
        codec_up=up,
        codec_down=down,
        checkpoint_dir=os.path.join(workdir, "checkpoints", host),
        state=state,
        info={
            "run": os.path.basename(os.path.normpath(workdir)),
            "schedule": deployment.schedule_name(config),
            "epochs": int(config.train.epochs),
        },
        coordinator=coordinator,
        gather_seconds=float(settings.get("gather_seconds", 10.0)),
        run_eagerly=config.train.run_eagerly,
        jit_compile=bool(config.train.get("jit_compile", False)),
    )
    grpc_host.on_applied = _kill_after
    server, port = start_host(
        grpc_host, address, credentials, settings.max_message_mb << 20
    )
    log.info("%s serving %s on port %d", host, ", ".join(parties), port)
    if on_started is not None:
        on_started(port)
    try:
        if coordinator is None:  # a relay: serves until its server is done
            summary = _serve_until_done(grpc_host, links, host)
        else:
            process = HostProcess(config, grpc_host, strategy)
            summary = Runner(config, workdir, process, name=host).run()
            _wait_told(
                grpc_host,
                config.num_clients,
                _hosts_linking_to(config, host),
                settings.timeout_seconds,
            )
        time.sleep(0.5)  # let the last replies leave
    finally:
        grpc_host.closed.set()
        server.stop(grace=2.0).wait()
    _save_weights(parties, workdir)
    return summary


def _wait_told(grpc_host, num_clients: int, hosts: list, seconds: float) -> None:
    """Serves until every round-robin client (each waits for it, to take the
    last handoff) and every host sending here (a relay) has heard that the
    run is over, for at most `seconds`."""
    told = getattr(grpc_host.coordinator, "told_done", None)
    deadline = time.monotonic() + seconds

    def waiting() -> bool:
        clients = told is not None and len(told) < num_clients
        return clients or not set(hosts) <= grpc_host.hosts_told

    while waiting() and time.monotonic() < deadline:
        time.sleep(0.1)


def _hosts_linking_to(config, host: str) -> list:
    """The other hosts that send to the parties of `host`."""
    plan = deployment.layout(config)
    here = set(plan.hosts[host])
    return [h for h, parties in plan.host_links.items() if here & set(parties)]


def _serve_until_done(grpc_host, links, host: str) -> dict:
    """A host without a coordinator (a relay) serves until the run is done."""
    connection = next(iter(links.values())).connection
    while True:
        request = wire_pb2.JoinRequest(client_id=0, host=host)
        info = connection.call("Join", request, wire_pb2.JoinReply)
        if info.done:
            return {"done": True, "byte_counts": grpc_host.byte_counts()}
        time.sleep(0.5)


def _relay_link(config, party, address, credentials, token):
    """A host's link to a party on another host (a relay's to the server)."""
    settings = config.grpc
    connection = Connection(
        address,
        0,
        token=token,
        credentials=credentials,
        max_message_bytes=settings.max_message_mb << 20,
        timeout=settings.timeout_seconds,
        retry_seconds=settings.retry_seconds,
    )
    up, down = builders.codecs(config)
    multihop = config.topology == "multihop"
    specs = deployment.relay_link_specs(config) if multihop else {}
    return GrpcLink(connection, **specs, codec_up=up, codec_down=down, to=party)


def _save_weights(parties, workdir) -> None:
    """The final weights of every hosted segment (`<party>.weights.h5`)."""
    for name, party in parties.items():
        segments = _segments(party)
        for i, segment in enumerate(segments):
            suffix = f"_{i}" if len(segments) > 1 else ""
            segment.save_weights(os.path.join(workdir, f"{name}{suffix}.weights.h5"))


def _segments(party) -> list:
    inner = getattr(party, "server", party)
    inner = getattr(inner, "server", inner)  # SplitFed v2's ordered server
    copies = getattr(inner, "copies", None)
    if copies is not None:
        return [c.segment for c in copies]
    segment = getattr(inner, "segment", None)
    if segment is not None:
        return [segment]
    model = getattr(inner, "model", None)
    return [model] if model is not None else []


# ----------------------------------------------------------------- client
class ClientProcess(RunnerProcess):
    """Client k's part of the run, over gRPC links to the hosts."""

    def __init__(
        self,
        config,
        k: int,
        connect: dict,
        key=None,
        token=None,
        credentials=None,
        workdir=None,
        listen=None,
    ):
        self.config, self.k, self.workdir = config, k, workdir
        if workdir:
            os.makedirs(workdir, exist_ok=True)
        self.rounds = int(config.train.epochs)
        self.last = k == config.num_clients - 1
        settings = config.grpc
        self._connections = {}
        self._steps_done = 0
        self._restarted_rounds = 0

        def connection(address):
            if address not in self._connections:
                self._connections[address] = Connection(
                    address,
                    k,
                    token=token,
                    credentials=credentials,
                    max_message_bytes=settings.max_message_mb << 20,
                    timeout=settings.timeout_seconds,
                    retry_seconds=settings.retry_seconds,
                )
            return self._connections[address]

        up, down = builders.codecs(config)
        layout = deployment.layout(config)
        self.links = {
            party: GrpcLink(
                connection(connect[party]), codec_up=up, codec_down=down, to=party
            )
            for party in layout.client_links
        }
        self.inbox, self._inbox_server = None, None
        if layout.peers and config.num_clients > 1:
            self._serve_inbox(k, listen, token, workdir)
            following = f"client_{(k + 1) % config.num_clients}"
            self.links["next"] = ControlLink(connection(connect[following]), following)
        self.info = self._join(layout.client_links[0])
        self.program = deployment.client_program(
            config, k, self.links, key, self.inbox, None
        )
        self._bind(layout)
        self.site = client_data.site_of(config, k)
        if config.topology == "vertical":
            self.site = self._aligned(self.site)
        self.steps_per_round = len(self._batches(0)) if self._finite() else 0
        self._snapshots = {}

    # ---------------------------------------------------------------- setup
    def _serve_inbox(self, k, listen, token, workdir):
        path = os.path.join(workdir, "inbox.sealed") if workdir else None
        self.inbox = Inbox(k, path)
        tokens = None
        host = GrpcHost({f"client_{k}": self.inbox}, self.config.num_clients, tokens)
        self._inbox_server, port = start_host(host, f"127.0.0.1:{listen or 0}")
        self._inbox_host = host
        log.info("client %d: inbox on port %d", k, port)

    def _join(self, party):
        connection = self.links[party].connection
        request = wire_pb2.JoinRequest(
            client_id=self.k, to=party, schedule=deployment.schedule_name(self.config)
        )
        info = connection.call("Join", request, wire_pb2.JoinReply)
        up, down = builders.codecs(self.config)
        if (info.codec_up, info.codec_down) != (up, down):
            raise ValueError(
                f"the host uses codecs {info.codec_up}/{info.codec_down}, this "
                f"client {up}/{down}"
            )
        return info

    def _bind(self, layout):
        """Tells each link what it carries (the program's cut tensors, the
        receiving party's outputs), before the first step is compiled."""
        program = self.program
        client = getattr(program, "client", None)
        for party, link in self.links.items():
            if not isinstance(link, GrpcLink):
                continue
            if client is None:  # a whole-model client: weights only
                link.weight_specs = _weight_specs(program.model.weights)
                continue
            segment = client.segment
            cut = [(wire_dtype(t.dtype), t.shape) for t in segment.outputs]
            used = getattr(program, "_used", None)
            if party.startswith("head_") and used is not None:
                cut = [cut[j] for j in used[int(party.split("_")[1])]]
            outputs = (
                list(self._join(party).output_dtypes) if party != "aligner" else []
            )
            tail = client.tail
            link.bind(
                [d for d, _ in cut],
                [s for _, s in cut],
                outputs,
                [t.shape for t in tail.inputs] if tail is not None else None,
                ushaped=tail is not None,
            )
            if party == "fed":
                from splitkeras.schedules.splitfed import client_weights

                link.weight_specs = _weight_specs(client_weights(client))

    def _aligned(self, site):
        """This vertical party's rows of the intersection (kept in its workdir,
        so that a restarted client does not align again)."""
        path = os.path.join(self.workdir, "aligned_rows.npy") if self.workdir else None
        if path and os.path.exists(path):
            rows = np.load(path)
        else:
            ids = client_data.vertical_ids(site)
            rows = yield_all(
                alignment.align(
                    self.links["aligner"], self.k, self.config.num_clients, ids
                )
            )
            if path:
                np.save(path, rows)
        return client_data.aligned_site(site, rows)

    # --------------------------------------------------------------- rounds
    def _finite(self) -> bool:
        return hasattr(self.site, "x_train")

    def _batches(self, epoch):
        return client_data.train_batches(self.config, self.site, self.k, epoch)

    def _test(self):
        return client_data.test_batches(self.config, self.site)

    @property
    def optimizers(self):
        program = self.program
        client = getattr(program, "client", None)
        optimizer = client.optimizer if client is not None else program.optimizer
        return [optimizer] if optimizer is not None else []

    def start_epoch(self, saved: int) -> int:
        return int(self.info.epoch)

    def round(self, epoch, skip=0):
        if self.config.method == "split" and self.config.topology in (
            "vanilla",
            "ushaped",
        ):
            steps = self._turn(epoch)
        else:
            steps = self._rounds_from(epoch)
        for loss in steps:
            yield loss
            self._steps_done += 1
            _kill_after(self._steps_done)

    def _turn(self, epoch):
        """Round robin: this client's turn, trained again if rolled back."""
        program = self.program
        program.train_data = lambda e, s: self._batches(e)
        program.test_data = self._test() if self.last else None
        while True:
            try:
                yield from program.turn(epoch, evaluate=self.last)
                return
            except (TurnRestarted, tf.errors.OpError) as e:
                cause = _cause(e, self.links)
                if not isinstance(cause, TurnRestarted):
                    raise cause from None
                program.restarts += 1
                log.warning(
                    "client %d: turn of round %d restarts: %s", self.k, epoch, cause
                )

    def _rounds_from(self, epoch):
        """Round `epoch` (and, after a host went back, the rounds before it)."""
        target = epoch
        while True:
            try:
                for e in range(target, epoch + 1):
                    self._restore_or_snapshot(e)
                    yield from self._one_round(e)
                return
            except (TurnRestarted, tf.errors.OpError) as e:
                cause = _cause(e, self.links)
                if not isinstance(cause, TurnRestarted):
                    raise cause from None
                back = int(self._join(next(iter(self.links))).epoch)
                if back not in self._snapshots:
                    raise RuntimeError(
                        f"client {self.k}: the host went back to round {back}, "
                        "before this client's oldest saved state"
                    ) from cause
                log.warning(
                    "client %d: round %d restarts from round %d: %s",
                    self.k,
                    epoch,
                    back,
                    cause,
                )
                self._restarted_rounds += 1
                self._snapshots = {
                    e: s for e, s in self._snapshots.items() if e <= back
                }
                self._restore(back)
                target = back

    def _restore_or_snapshot(self, epoch) -> None:
        if epoch in self._snapshots:
            self._restore(epoch)
        else:
            self._snapshots[epoch] = [
                np.array(v.numpy()) for v in _variables(self.program)
            ]
            for old in [e for e in self._snapshots if e < epoch - 1]:
                del self._snapshots[old]

    def _restore(self, epoch) -> None:
        for variable, value in zip(_variables(self.program), self._snapshots[epoch]):
            variable.assign(value)

    def _one_round(self, epoch):
        program, batches = self.program, self._batches(epoch)
        if program.begin(epoch, _length(batches)) == Status.DONE:
            return
        yield from program.train(epoch, batches)
        if self.config.topology == "vertical":
            # Every feature holder sends its part of each test batch; the
            # first reports.
            program.finish(epoch, self._test(), reports=self.k == 0)
            return
        program.finish(epoch, self._test() if self.k == 0 else None)

    def finish(self) -> None:
        """Round robin: waits until the host says the run is over (so that
        this client's inbox takes the last round's handoff)."""
        program = self.program
        if isinstance(program, TurnClient):
            program.link.poll(Message(Kind.BEGIN, self.k, round=self.rounds))

    def summary(self, test: dict) -> dict:
        connections = list(self._connections.values())
        return {
            "client_id": self.k,
            "bytes_sent": sum(c.bytes_sent for c in connections),
            "bytes_received": sum(c.bytes_received for c in connections),
            "retries": sum(c.retries for c in connections),
            "restarted_turns": int(getattr(self.program, "restarts", 0)),
            "restarted_rounds": self._restarted_rounds,
        }

    def checkpoints(self, **loop) -> dict:
        return {}

    def save(self, workdir: str) -> None:
        """The final weights of this client's segments or model."""
        program = self.program
        client = getattr(program, "client", None)
        if client is None:
            program.model.save_weights(os.path.join(workdir, "model.weights.h5"))
            return
        client.segment.save_weights(os.path.join(workdir, "client.weights.h5"))
        if client.tail is not None:
            client.tail.save_weights(os.path.join(workdir, "tail.weights.h5"))

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        if self._inbox_server is not None:
            self._inbox_host.closed.set()
            self._inbox_server.stop(grace=1.0).wait()


def _variables(program) -> list:
    """Everything a client program holds that a round changes."""
    client = getattr(program, "client", None)
    if client is not None:
        variables = state_variables(client)
    else:
        variables = list(program.model.variables)
        if program.optimizer is not None:
            variables += list(program.optimizer.variables)
    step = getattr(program, "_step", None)
    return variables + ([step] if step is not None else [])


def _weight_specs(weights) -> list:
    return [(tf.as_dtype(w.dtype), [int(d) for d in w.shape]) for w in weights]


def _length(dataset) -> int:
    n = int(dataset.cardinality())
    return n if n >= 0 else 0


def _cause(error, links):
    """The exception behind an op error raised inside a link's round trip."""
    if isinstance(error, tf.errors.OpError):
        for link in links.values():
            inner = getattr(link, "error", None)
            if inner is not None:
                link.error = None
                return inner
    return error


def run_client(
    config,
    client_id: int,
    connect: dict,
    key: bytes | None = None,
    workdir: str | None = None,
    token: str | None = None,
    credentials=None,
    listen: int | None = None,
) -> dict:
    """Runs client `client_id` of `config`'s run against its hosts.

    Args:
      config: the run's config (every process of a run gets the same one).
      client_id: this client's id, 0..K-1.
      connect: {party: "host:port"} of every party this client sends to
        (`deployment.layout(config).client_links`, and with a peer handoff
        the next client's "client_<k+1>").
      key: the clients' shared handoff key (round robin).
      workdir: where this client writes its summary, TensorBoard, final
        weights (and its inbox, aligned rows); None: a temporary folder.
      token: this client's token (if the hosts require tokens).
      credentials: `grpc.ChannelCredentials` (TLS), or None for plaintext.
      listen: the port of this client's inbox (peer handoff).

    Returns:
      This client's summary: steps, bytes it sent and received, retries,
      restarted turns.
    """
    import tempfile

    workdir = workdir or tempfile.mkdtemp(prefix=f"client_{client_id}-")
    process = ClientProcess(
        config, client_id, connect, key, token, credentials, workdir, listen
    )
    try:
        summary = Runner(config, workdir, process, name=f"client {client_id}").run()
        process.save(workdir)
    finally:
        process.close()
    return summary


# ---------------------------------------------------------------- predict
def serve_predictions(
    config,
    workdir: str,
    address: str = "127.0.0.1:0",
    credentials=None,
    tokens: dict | None = None,
    on_started=None,
    stop=None,
):
    """Serves split inference with the server segment trained in `workdir`.

    Clients (a Keras `Client.predict_step` over a `GrpcLink`, or an edge
    client's `predict`) send their cut tensors in PREDICT messages and get
    the server segment's outputs back. No training, no checkpoints. Runs
    until `stop` (a `threading.Event`) is set, or forever.
    """
    from splitkeras.parties import Server

    segments = builders.build_segments(config)
    load_trained([segments.server], workdir, "server", "server.weights.h5")
    objective = None if segments.ushaped else builders.make_objective(config)
    server = Server(segments.server, builders.make_optimizer(config), objective)
    up, down = codec_lib.codec_pair(config)
    host = GrpcHost(
        {"server": server},
        config.num_clients,
        tokens=tokens,
        codec_up=up,
        codec_down=down,
        run_eagerly=config.train.run_eagerly,
    )
    grpc_server, port = start_host(
        host, address, credentials, config.grpc.max_message_mb << 20
    )
    log.info("Serving predictions on port %d", port)
    if on_started is not None:
        on_started(port)
    try:
        while not (stop is not None and stop.wait(1.0)):
            if stop is None:
                time.sleep(1.0)
    finally:
        host.closed.set()
        grpc_server.stop(grace=1.0).wait()
