"""A server on several machines behind gRPC: the chief mirrors its steps.

With `config.server.strategy=multi_worker` every server process (worker)
runs `tf.distribute.MultiWorkerMirroredStrategy`: each step's batch is split
over all the workers' replicas, and their gradients are summed by collective
ops, so every worker must run the same steps on the same messages in the same
order. The clients talk to one worker, the chief (`serve`); the others follow
it (`follow`). The chief streams to each follower, in the order it runs
them:

- every message its distributed party computes (a training step, an
  evaluation or prediction batch), as decoded and checked by the chief;
- its commits (the end of a turn) and rollbacks (back to the last commit);
- the end of the run.

A follower computes the same steps (its slice of each batch), commits and
rolls back with the chief, and saves its final weights when the run ends.

The stream (`/splitkeras.Mirror/Follow`) is served on the chief's gRPC port
only to a caller that presents the server's secret (`SECRET_VARIABLE`, the
same random string in every server process's environment) from an address
of the cluster's workers (`TF_CONFIG`). It carries every client's cut
tensors and labels: keep the secret on the server machines.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import os
import queue
import socket
import threading

import grpc
import numpy as np

from splitkeras.protocol import Kind, Message
from splitkeras.transport.grpc_client import channel_options

log = logging.getLogger("splitkeras")

__all__ = [
    "CALL",
    "COMMIT",
    "DONE",
    "HELLO",
    "ABORT",
    "ROLLBACK",
    "Follower",
    "Mirror",
    "follow_stream",
]

FOLLOW = "/splitkeras.Mirror/Follow"
WORKER_METADATA = "x-splitkeras-worker"
SECRET_METADATA = "x-splitkeras-server-secret"
# The environment variable holding the secret the server's workers share
# (the launcher makes one per run).
SECRET_VARIABLE = "SPLITKERAS_SERVER_SECRET"


def server_secret() -> str:
    """The server workers' shared secret ($SPLITKERAS_SERVER_SECRET)."""
    secret = os.environ.get(SECRET_VARIABLE, "")
    if len(secret) < 16:
        raise ValueError(
            f"a multi_worker server needs ${SECRET_VARIABLE}: the same random "
            "string (16 characters or more) in the environment of every "
            'server process, e.g. from python -c "import secrets; '
            'print(secrets.token_urlsafe(32))"'
        )
    return secret


# What an item of the stream says.
HELLO = "hello"  # the first item: the chief's commits so far
CALL = "call"  # a message of a distributed party
COMMIT = "commit"
ROLLBACK = "rollback"
DONE = "done"
ABORT = "abort"  # the chief stopped before the run's end


def pack(what: str, party: str = "", message: Message | None = None, **numbers):
    """An item of the stream as bytes (an .npz archive, nothing pickled)."""
    arrays = {"what": np.array(what), "party": np.array(party)}
    arrays.update({f"n_{k}": np.array(v, np.int64) for k, v in numbers.items()})
    if message is not None:
        arrays.update(
            kind=np.array(int(message.kind), np.int64),
            client=np.array(message.client_id, np.int64),
            step=np.array(int(message.step), np.int64),
            offset=np.array(int(message.offset), np.int64),
            rows=np.array(int(message.rows), np.int64),
            tensors=np.array(len(message.tensors), np.int64),
        )
        for i, tensor in enumerate(message.tensors):
            arrays[f"tensor_{i}"] = np.asarray(tensor)
        for field in ("labels", "sample_weight", "ids"):
            value = getattr(message, field)
            if value is not None:
                arrays[field] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> tuple[str, str, Message | None, dict]:
    """(what, party, message or None, numbers) of a packed item."""
    archive = np.load(io.BytesIO(data), allow_pickle=False)
    what, party = str(archive["what"]), str(archive["party"])
    numbers = {k[2:]: int(archive[k]) for k in archive.files if k.startswith("n_")}
    if "kind" not in archive.files:
        return what, party, None, numbers
    optional = {
        f: archive[f] if f in archive.files else None
        for f in ("labels", "sample_weight", "ids")
    }
    message = Message(
        Kind(int(archive["kind"])),
        int(archive["client"]),
        int(archive["step"]),
        tuple(archive[f"tensor_{i}"] for i in range(int(archive["tensors"]))),
        optional["labels"],
        optional["sample_weight"],
        ids=optional["ids"],
        offset=int(archive["offset"]),
        rows=int(archive["rows"]),
    )
    return what, party, message, numbers


DONE_ITEM = pack(DONE)
ABORT_ITEM = pack(ABORT)
END_ITEMS = (DONE_ITEM, ABORT_ITEM)


class Mirror:
    """The chief's side: a queue of items per follower, served as a stream.

    Args:
      followers: the other workers' indices (1..N-1 of a cluster of N).
      hosts: the addresses (IPs) the followers may connect from.
      secret: what a follower must present (`server_secret()`).
    """

    def __init__(self, followers, hosts, secret: str):
        self._queues = {int(i): queue.Queue() for i in followers}
        self._hosts = set(hosts)
        self._secret = secret.encode()
        self._connected = set()
        self._lock = threading.Condition()

    @classmethod
    def for_cluster(cls, cluster: dict, secret: str) -> Mirror:
        """The mirror of a chief whose cluster is `cluster` ({"worker": [...]}
        of TF_CONFIG, worker 0 the chief)."""
        workers = list(cluster.get("worker", []))
        hosts = set()
        for address in workers:
            hosts |= _addresses(address.rsplit(":", 1)[0])
        return cls(range(1, len(workers)), hosts, secret)

    def __len__(self) -> int:
        """The followers."""
        return len(self._queues)

    # ------------------------------------------------------------- chief
    def publish(self, item: bytes) -> None:
        for q in self._queues.values():
            q.put(item)

    def call(self, party: str, message: Message) -> None:
        self.publish(pack(CALL, party, message))

    def wait_for_followers(self, seconds: float) -> None:
        """Waits until every follower has connected; TimeoutError if not."""
        with self._lock:
            if not self._lock.wait_for(
                lambda: len(self._connected) == len(self._queues), seconds
            ):
                missing = sorted(set(self._queues) - self._connected)
                raise TimeoutError(
                    f"server workers {missing} did not connect in {seconds:.0f} s "
                    "(start them with splitkeras serve --chief=HOST:PORT and the "
                    "same TF_CONFIG cluster)"
                )

    def handler(self, hello: bytes) -> grpc.GenericRpcHandler:
        """The gRPC handler of the stream; `hello` is each follower's first item."""

        def follow(request: bytes, context):
            worker = self._admit(context)
            yield hello
            items = self._queues[worker]
            while True:
                item = items.get()
                yield item
                if item in END_ITEMS:
                    return

        return grpc.method_handlers_generic_handler(
            "splitkeras.Mirror",
            {"Follow": grpc.unary_stream_rpc_method_handler(follow)},
        )

    def _admit(self, context) -> int:
        metadata = dict(context.invocation_metadata())
        try:
            worker = int(metadata.get(WORKER_METADATA, ""))
        except ValueError:
            worker = -1
        presented = metadata.get(SECRET_METADATA, "").encode()
        if not hmac.compare_digest(presented, self._secret):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "wrong or missing server secret: a follower needs the chief's "
                f"${SECRET_VARIABLE}",
            )
        host = _peer_host(context.peer())
        if host not in self._hosts:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{host} is not a worker of this server's cluster",
            )
        with self._lock:
            if worker not in self._queues:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"worker {worker} is not a follower of this chief "
                    f"(followers: {sorted(self._queues)})",
                )
            if worker in self._connected:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"worker {worker} already follows (a restarted worker needs "
                    "every server process restarted)",
                )
            self._connected.add(worker)
            self._lock.notify_all()
        log.info("server worker %d follows from %s", worker, host)
        return worker


class Follower:
    """A follower's state: applies the chief's items in order.

    Args:
      parties: its hosted parties, built as the chief's ({name: party}).
      state: their checkpointed state ({name: trackable}), as the chief's.
      directory: where it commits (restored from, when it holds a commit).
      run_eagerly / jit_compile: how its steps are compiled (the chief's).
    """

    def __init__(self, parties, state, directory, run_eagerly=False, jit_compile=False):
        import tensorflow as tf

        from splitkeras.transport.host_steps import HostSteps

        self.parties = parties
        self.steps = HostSteps(parties, run_eagerly, jit_compile)
        self.commits = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(**state, commits=self.commits),
            directory,
            max_to_keep=3,
        )
        self.counts = {"steps": 0, "failed_steps": 0, "commits": 0, "rollbacks": 0}
        if self._manager.latest_checkpoint:
            self._restore()
        else:
            self._commit()  # as the chief's host does at its start

    def apply(self, item: bytes) -> bool:
        """Applies one item of the chief's stream; True at the run's end."""
        what, name, message, numbers = unpack(item)
        if what == HELLO:
            here, chief = int(self.commits.numpy()), numbers["commits"]
            kept = [p for p in self._manager.checkpoints if p.endswith(f"ckpt-{chief}")]
            if chief != here and kept:
                # The chief stopped between telling a commit and saving it
                # (or the other way round): back to the commit it holds.
                self._manager.checkpoint.restore(
                    kept[0]
                ).assert_existing_objects_matched()
                log.warning("server worker: back to the chief's commit %d", chief)
            elif chief != here:
                raise RuntimeError(
                    f"this server worker is at commit {here}, the chief at "
                    f"{numbers['commits']}: restart every server process of the "
                    "run together, from the same workdirs"
                )
        elif what == CALL:
            try:
                self.steps.handle(name, self.parties[name], message)
                self.counts["steps"] += 1
            except Exception:  # the chief's step failed too: it rolls back
                log.exception("a mirrored %s failed", message.kind.name)
                self.counts["failed_steps"] += 1
        elif what == COMMIT:
            self._commit()
            self.counts["commits"] += 1
        elif what == ABORT:
            raise RuntimeError(
                "the chief stopped before the run's end (see its log); start "
                "every server process again to resume from the last commit"
            )
        elif what == ROLLBACK:
            self._restore()
            self.steps.rolled_back()
            self.counts["rollbacks"] += 1
        return what == DONE

    def _commit(self) -> None:
        self.commits.assign_add(1)
        self._manager.save(checkpoint_number=int(self.commits.numpy()))

    def _restore(self) -> None:
        checkpoint = self._manager.checkpoint
        checkpoint.restore(
            self._manager.latest_checkpoint
        ).assert_existing_objects_matched()


def follow_stream(
    target: str, worker: int, secret: str, credentials=None, max_bytes=64 << 20
):
    """The follower's side: the chief's items, in order (a generator)."""
    options = channel_options(max_bytes)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        grpc.channel_ready_future(channel).result(timeout=300)
        metadata = ((WORKER_METADATA, str(worker)), (SECRET_METADATA, secret))
        stream = channel.unary_stream(FOLLOW)(
            b"", metadata=metadata, wait_for_ready=True
        )
        yield from stream


def _addresses(host: str) -> set:
    host = host.strip("[]")
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return set()


def _peer_host(peer: str) -> str:
    """The IP of a gRPC peer string ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return rest.rsplit(":", 1)[0]
