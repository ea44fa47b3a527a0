"""One client process of a run over gRPC: `run_client(config, k, connect)`.

Client k reads its own site only (`config.data.sites`, or its part of the
dataset), builds its program (`deployment.client_program`) and trains its
part of every round through gRPC links to the hosts, driven by the same
`Runner` as an in-process run. Restarted turns (round robin) and rounds
(the others) are trained again from the state at their start: the
handed-on state, or this client's own snapshot of the round's start.

The client that evaluates a round (round robin: the last; the others:
client 0) measures the leakage of its own cut as an in-process run does
(`Leakage`, on its site's first test examples): `leakage_dcor` goes with
its REPORT to the host's validation figures (the hijack guard's figures
do not: the server must not learn them), its warnings and
`leakage_dcor_start` to its own summary, and with
`config.privacy.reconstruction_examples` the run ends with the
reconstruction attack on its segment (under its workdir). A U-shaped
client also scores the label-leak attacks on the gradients it would send
for the server's outputs, which it asks of the host (PREDICT). Each
vertical party without the labels measures `leakage_dcor_<k>` of its own
strip as the run in one process does, into its own summary; the label-leak
AUCs of the gradients it receives are the host's to score (it has the
labels and every party's cut tensors: `EvaluationLeak`).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow as tf

from splitkeras import builders, client_data, deployment
from splitkeras.data.pipeline import batches_in
from splitkeras.data.streaming import StreamingSource
from splitkeras.launcher import kill_after
from splitkeras.parties.handoff import state_variables
from splitkeras.parties.segment_step import wire_dtype
from splitkeras.privacy.leakage import Leakage, guard_report
from splitkeras.protocol import Kind, Message, Status
from splitkeras.runner import Runner, RunnerProcess
from splitkeras.schedules import alignment
from splitkeras.transport.grpc_client import Connection, ControlLink, TurnRestarted
from splitkeras.transport.grpc_host import GrpcHost, start_host
from splitkeras.transport.grpc_link import GrpcLink
from splitkeras.transport.proto import wire_pb2
from splitkeras.transport.sealing import read_key, write_key
from splitkeras.transport.turns import Inbox, TurnClient, yield_all

log = logging.getLogger("splitkeras")

__all__ = ["ClientProcess", "read_key", "run_client", "write_key"]


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
                self._connections[address] = Connection.from_settings(
                    address, k, settings, token, credentials
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
        # A stream (imagenet2012) makes each round's batches of client k's
        # shard; arrays are cut into this client's site.
        data = client_data.shared_data(config)
        self.stream = data if isinstance(data, StreamingSource) else None
        self.site = client_data.site_of(config, k, data)
        if config.topology == "vertical":
            self.site = self._aligned(self.site)
        self.steps_per_round = len(self._batches(0)) if self._finite() else 0
        self._snapshots = {}
        self.measured = {}  # the last leakage figures this client measured
        self.leakage = self._leakage()

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
            client_id=self.k,
            to=party,
            schedule=deployment.schedule_name(self.config),
            config=json.dumps(deployment.config_fingerprint(self.config)),
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

    def _leakage(self):
        """The `Leakage` of the client that evaluates the rounds (vertical:
        of each party without the labels, on its own strip), measured at
        each evaluation through its program's `leakage` hook; None for the
        others, whole-model clients and streamed data."""
        program, config = self.program, self.config
        if (
            getattr(program, "client", None) is None  # a whole model
            or not hasattr(program, "leakage")
            or not self._finite()
        ):
            return None
        vertical = config.topology == "vertical"
        if vertical:
            measures = self.site.y_test is None  # a party without the labels
        else:
            measures = self.last if self._turns() else self.k == 0
        if not measures:
            return None
        leakage = Leakage(config, self.site, strips=[self.site] if vertical else None)
        if not leakage.enabled:
            return None
        # The untrained client, as in process.
        if vertical:
            leakage.party_start(program.client, self.k)
        else:
            leakage.measure_start(program)

        def measure(client):
            if vertical:
                figures = leakage.party(client, self.k)
            else:
                # U-shaped: the server's outputs for the label-leak attack
                # come from its host (PREDICT).
                outputs = self._server_outputs if client.tail is not None else None
                figures = leakage(program, server_outputs=outputs)
            # The hijack guard's figures stay here: the server it watches
            # must not learn its score or its alarm.
            self.measured = {
                k: v for k, v in figures.items() if not k.startswith("hijack_")
            }
            return self.measured

        program.leakage = measure
        return leakage

    def _server_outputs(self, cut) -> list:
        """The server's outputs for `cut` (the leakage examples' cut
        tensors), asked of the host with a PREDICT message. Its step id is
        drawn at random: the host answers a repeated PREDICT step from its
        cache, and a restarted client numbers from scratch."""
        step = int.from_bytes(os.urandom(7), "big") + 1
        reply = self.links["server"].request(
            Message(Kind.PREDICT, self.k, step, tuple(cut))
        )
        return list(reply.tensors)

    # --------------------------------------------------------------- rounds
    def _finite(self) -> bool:
        return hasattr(self.site, "x_train")

    def _turns(self) -> bool:
        """Round robin: this client trains turns."""
        return self.config.method == "split" and self.config.topology in (
            "vanilla",
            "ushaped",
        )

    def _batches(self, epoch):
        return client_data.train_batches(
            self.config, self.site, self.k, epoch, self.stream
        )

    def _test(self):
        return client_data.test_batches(self.config, self.site, self.stream)

    @property
    def optimizers(self):
        program = self.program
        client = getattr(program, "client", None)
        optimizer = client.optimizer if client is not None else program.optimizer
        return [optimizer] if optimizer is not None else []

    def start_epoch(self, saved: int) -> int:
        return int(self.info.epoch)

    def round(self, epoch, skip=0):
        if self._turns():
            steps = self._turn(epoch)
        else:
            steps = self._rounds_from(epoch)
        for loss in steps:
            yield loss
            self._steps_done += 1
            kill_after(self._steps_done)

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
        count = getattr(program, "counts_unknown", False)  # as in one process
        if program.begin(epoch, batches_in(batches, count)) == Status.DONE:
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
        client = getattr(self.program, "client", None)
        # The hijack guard's figures and alarm, as an in-process run has them.
        guard, warnings = guard_report([] if client is None else [client])
        for warning in warnings:
            log.warning("Privacy: %s", warning)
        leakage = {}
        if self.leakage is not None:
            leakage = {**self.leakage.summary(), **self.measured}
            del leakage["privacy_warnings"]  # the guard's are above, as of now
            warnings += self.leakage.found
        return {
            "client_id": self.k,
            "bytes_sent": sum(c.bytes_sent for c in connections),
            "bytes_received": sum(c.bytes_received for c in connections),
            "retries": sum(c.retries for c in connections),
            "restarted_turns": int(getattr(self.program, "restarts", 0)),
            "restarted_rounds": self._restarted_rounds,
            **leakage,
            **guard,  # the guard's figures now, not at the last measurement
            **({"privacy_warnings": warnings} if warnings or leakage else {}),
        }

    def attacks(self, workdir: str, step: int) -> dict:
        """The reconstruction attack on this client's segment, if it
        evaluates and `config.privacy.reconstruction_examples` is set (not
        on a client restarted after the last round: it has not trained)."""
        if self.leakage is None or not self.measured:
            return {}
        return self.leakage.reconstruction(self.program, workdir, step)

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

    deployment.check_over_grpc(config)
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
