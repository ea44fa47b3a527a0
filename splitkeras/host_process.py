"""A host process of a run over gRPC (the client side: `client_process`).

`serve(config, workdir, host=...)` runs a host of `config`'s schedule (the
server side: the parties `deployment.layout` puts on it) until every round
is trained; it reads no dataset. `client_process.run_client(config, k,
connect, ...)` runs client k: it reads its own site only
(`config.data.sites`, or its part of the dataset), builds its program and
trains its part of every round through gRPC links to the hosts. Both drive
their process with the same
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

import json
import logging
import os
import resource
import time

from splitkeras import builders, deployment, distribute
from splitkeras import data as data_lib
from splitkeras.checkpointing import CheckpointMismatch, load_trained
from splitkeras.launcher import kill_after
from splitkeras.privacy.leakage import images_of, near_chance_warning
from splitkeras.runner import Runner, RunnerProcess, cannot_resume
from splitkeras.schedules import pipelining
from splitkeras.transport import codec as codec_lib
from splitkeras.transport import mirror as mirror_lib
from splitkeras.transport.grpc_client import Connection
from splitkeras.transport.grpc_host import GrpcHost, start_host
from splitkeras.transport.grpc_link import GrpcLink
from splitkeras.transport.proto import wire_pb2

log = logging.getLogger("splitkeras")

# How often a host's runner looks at the steps applied (HostProcess.round).
POLL_SECONDS = 0.05

__all__ = ["HostProcess", "follow", "lock_workdir", "serve", "serve_predictions"]


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
        ended = False
        while not ended:
            # The host's lock is held only while reading: the runner's work
            # on each step (progress, summaries, checkpoints) runs beside the
            # next exchange instead of blocking it. The steps and the round's
            # end are read together, so that none is missed. The runner looks
            # every POLL_SECONDS, not at every exchange: waking at each one
            # to read the coordinator's variables took a fifth of a LeNet
            # server's busy time (py-spy) from the exchanges.
            with self.host._changed:
                now = int(self.coordinator.step.numpy())
                ended = self._ended(epoch)
            for _ in range(now - seen):
                yield None
            seen = now
            if not ended:
                time.sleep(POLL_SECONDS)

    def _ended(self, epoch) -> bool:
        return int(self.coordinator.round.numpy()) > epoch or self.host.done

    def logs(self, epoch):
        return self.coordinator.logs.get(epoch, ({}, {}))

    def byte_counts(self) -> dict:
        return self.host.byte_counts()

    def summary(self, test: dict) -> dict:
        from splitkeras.experiment import byte_totals, summary_fields

        per_client = self.byte_counts()
        replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
        # The host has the test accuracy (vanilla: its own; U-shaped: the
        # client's report), so it says when NoPeek took the task down.
        warnings = near_chance_warning(
            test.get("accuracy"),
            builders.data_spec(self.config).num_classes,
            float(self.config.privacy.get("nopeek_alpha", 0.0)),
        )
        for warning in warnings:
            log.warning("Privacy: %s", warning)
        party_fields = getattr(self.coordinator, "host_summary", None)
        return {
            **summary_fields(self.config, self.config.data.name, test),
            **(party_fields() if party_fields is not None else {}),
            **({"privacy_warnings": warnings} if warnings else {}),
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
    hijack_inputs=None,
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
      hijack_inputs: a red team's host (round robin): a feature-space
        hijacker trained on these inputs (as the input pipeline gives them)
        answers in the place of the server (`deployment.hosted_parties`).

    Returns:
      The host's summary.
    """
    deployment.check_over_grpc(config)
    strategy = distribute.make_strategy(config.get("server", {}))  # first
    distribute.check_supported(config, strategy)
    worker = distribute.worker_index(strategy)
    lock = lock_workdir(workdir)  # noqa: F841 (held until this returns)
    if worker:
        raise ValueError(
            f"this process is worker {worker} of a multi_worker server: only "
            "worker 0 (the chief) serves the clients; start the others with "
            "splitkeras serve --chief=HOST:PORT (the chief's address)"
        )
    settings = config.grpc
    links = {
        party: _relay_link(config, party, address_of, connect_credentials, token)
        for party, address_of in (connect or {}).items()
    }
    parties, coordinator, state = deployment.hosted_parties(
        config, host, links, strategy, clock=time.monotonic, hijack_inputs=hijack_inputs
    )
    if hijack_inputs is not None:
        log.warning(
            "%s: a feature-space HIJACKER answers the clients (--hijack): it "
            "does not train the task",
            host,
        )
    up, down = builders.codecs(config)
    count, ahead = pipelining(config)
    in_flight = count * (ahead + 1)  # a client's calls that may be open at once
    try:  # resumes from the host's last commit, if any
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
                "config": deployment.config_fingerprint(config),
            },
            coordinator=coordinator,
            gather_seconds=float(settings.get("gather_seconds", 10.0)),
            run_eagerly=config.train.run_eagerly,
            jit_compile=bool(config.train.get("jit_compile", False)),
            keep=in_flight,  # any of them may be sent again
        )
    except CheckpointMismatch as e:
        raise cannot_resume(f"{host}: ", workdir, config, e) from e
    grpc_host.on_applied = kill_after
    finished = _finished_summary(grpc_host, workdir)
    if finished is not None:
        log.warning(
            "%s: the run in %s has finished (its summary: %s); nothing to serve",
            host,
            workdir,
            os.path.join(workdir, "summary.json"),
        )
        return finished
    mirror = None
    if worker == 0:  # the chief of a multi-worker server: the others follow
        cluster = strategy.cluster_resolver.cluster_spec().as_dict()
        mirror = mirror_lib.Mirror.for_cluster(cluster, mirror_lib.server_secret())
        grpc_host.mirror_to(mirror)
    server, port = start_host(
        grpc_host,
        address,
        credentials,
        settings.max_message_mb << 20,
        # A thread per call that may wait at once: every client's long poll,
        # and a client's micro-batches and steps in flight.
        workers=max(8, 2 * config.num_clients + 4) + in_flight + len(mirror or ()),
    )
    log.info("%s serving %s on port %d", host, ", ".join(parties), port)
    if on_started is not None:
        on_started(port)
    try:
        if mirror is not None:
            mirror.wait_for_followers(settings.retry_seconds)
        if coordinator is None:  # a relay: serves until its server is done
            summary = _serve_until_done(grpc_host, links, host, workdir)
        else:
            process = HostProcess(config, grpc_host, strategy)
            summary = Runner(config, workdir, process, name=host).run()
            _wait_told(
                grpc_host,
                config.num_clients,
                _hosts_linking_to(config, host),
                settings.timeout_seconds,
            )
        if mirror is not None:
            mirror.publish(mirror_lib.DONE_ITEM)
            mirror = None  # ended
        time.sleep(0.5)  # let the last replies leave
    finally:
        if mirror is not None:  # stopped early: the followers stop too
            mirror.publish(mirror_lib.ABORT_ITEM)
            time.sleep(0.5)
        grpc_host.closed.set()
        server.stop(grace=2.0).wait()
    _save_weights(parties, workdir)
    return summary


def hijack_inputs(config, path: str, examples: int):
    """A red team's inputs (`splitkeras serve --hijack`): the first
    `examples` training inputs of the dataset at `path` (as
    `config.data.path` takes one), as the config's input pipeline gives
    them."""
    arrays = data_lib.load(config.data.name, path, False)
    return images_of(arrays.x_train[:examples], arrays.y_train[:examples])


def follow(config, workdir: str, chief: str, credentials=None) -> dict:
    """Runs one of the other workers of a multi-worker server (not the chief).

    The worker builds the server as the chief does and then computes what
    the chief streams to it (`splitkeras.transport.mirror`), in order: each
    step and evaluation batch (its slice; the strategy's collective ops join
    the workers' gradients and outputs), each commit and rollback. When the
    run ends it saves its final weights and summary.json in its own directory
    (`distribute.worker_workdir`). Started again after a crash, it resumes
    from its last commit, which must be the chief's: restart every server
    process together.

    Args:
      config: the run's config (`config.server.strategy` = "multi_worker";
        `TF_CONFIG` names this worker, index >= 1).
      workdir: the run's server directory (this worker writes under it).
      chief: "host:port" where the chief serves its clients.
      credentials: `grpc.ChannelCredentials` when the chief serves TLS.
    """
    strategy = distribute.make_strategy(config.get("server", {}))  # first
    distribute.check_supported(config, strategy)
    worker = distribute.worker_index(strategy)
    if not worker:
        raise ValueError(
            "--chief is for the other workers of a server with "
            "config.server.strategy='multi_worker' (TF_CONFIG task index >= 1); "
            f"this process is {'the chief' if worker == 0 else 'not one of them'}"
        )
    workdir = distribute.worker_workdir(strategy, workdir)
    lock = lock_workdir(workdir)  # noqa: F841 (held until this returns)
    finished = os.path.join(workdir, "summary.json")
    if os.path.exists(finished):  # the chief returns at once too
        log.warning("server worker %d: the run has finished (%s)", worker, finished)
        with open(finished) as f:
            return json.load(f)
    parties, _, state = deployment.hosted_parties(
        config, "server", {}, strategy, clock=time.monotonic
    )
    follower = mirror_lib.Follower(
        parties,
        state,
        os.path.join(workdir, "checkpoints", "server"),
        run_eagerly=config.train.run_eagerly,
        jit_compile=bool(config.train.get("jit_compile", False)),
    )
    began = time.perf_counter()
    log.info("server worker %d follows the chief at %s", worker, chief)
    max_bytes = config.grpc.max_message_mb << 20
    secret = mirror_lib.server_secret()
    stream = mirror_lib.follow_stream(chief, worker, secret, credentials, max_bytes)
    for item in stream:
        if follower.apply(item):
            break
    else:
        raise RuntimeError(
            f"the chief at {chief} ended its stream before the run's end"
        )
    _save_weights(parties, workdir)
    summary = {
        "worker": worker,
        "server_replicas": strategy.num_replicas_in_sync,
        "wall_seconds": time.perf_counter() - began,
        **{f"mirrored_{k}": v for k, v in follower.counts.items()},
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def _finished_summary(grpc_host, workdir: str) -> dict | None:
    """The summary of a run this host already finished (restarted on its
    workdir after the end), else None."""
    path = os.path.join(workdir, "summary.json")
    if not grpc_host.done or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def lock_workdir(workdir: str):
    """Takes `workdir` for this host process (an exclusive lock on
    `workdir/.lock`, released when the returned file is closed or the process
    ends, also by a crash). A second host on the same workdir is refused:
    its commits and checkpoints would overwrite this one's.

    Raises:
      RuntimeError: another process holds the workdir.
    """
    import fcntl

    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, ".lock"), "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RuntimeError(
            f"{workdir} is in use by {holder}: two hosts cannot share a "
            "workdir (stop it, or give this one its own --workdir)"
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


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


def _serve_until_done(grpc_host, links, host: str, workdir: str) -> dict:
    """A host without a coordinator (a relay) serves until the run is done;
    its summary (workdir/summary.json) holds the bytes of its clients' link."""
    from splitkeras.experiment import byte_totals

    connection = next(iter(links.values())).connection
    began = time.perf_counter()
    while True:
        request = wire_pb2.JoinRequest(client_id=0, host=host)
        info = connection.call("Join", request, wire_pb2.JoinReply)
        if info.done:
            break
        time.sleep(0.5)
    per_client = grpc_host.byte_counts()
    summary = {
        "host": host,
        "transport": "grpc",
        **byte_totals(per_client),
        "per_client": per_client,
        "wall_seconds": time.perf_counter() - began,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def _relay_link(config, party, address, credentials, token):
    """A host's link to a party on another host (a relay's to the server)."""
    connection = Connection.from_settings(address, 0, config.grpc, token, credentials)
    up, down = builders.codecs(config)
    multihop = config.topology == "multihop"
    specs = deployment.relay_link_specs(config) if multihop else {}
    return GrpcLink(connection, **specs, codec_up=up, codec_down=down, to=party)


def _save_weights(parties, workdir) -> None:
    """The final weights of every hosted segment (`<party>.weights.h5`;
    none of a hijacking host, which trained none)."""
    for name, party in parties.items():
        if getattr(party, "hijacker", None) is not None:
            continue
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
