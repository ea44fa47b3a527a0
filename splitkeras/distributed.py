"""Split learning across processes: a gRPC server and its clients.

`serve(config, workdir, ...)` runs the server party of `config`'s split
(round robin over `config.num_clients` clients, vanilla or U-shaped) until
every epoch is trained; `run_client(config, target, client_id, ...)` runs one
client. They build the same model from the same seed as the in-process run,
cut it the same way, and the clients feed the same batches in the same order,
so the final weights equal those of `experiment.train_and_evaluate` with the
same config (tested within 1e-5 with codec float32).

The clients hand their segment state on through the server, sealed with
AES-GCM under a key only the clients share (`key_file`); the server stores
and forwards it without being able to read it. A turn is a transaction: the
server checkpoints at the end of every turn, and a turn that cannot finish
starts over from that checkpoint (server restart, client crash) or, after
silence past `config.grpc.turn_timeout_seconds`, is skipped and rolled back
(listed in summary.json), so no step is applied twice and none is half kept.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time

import tensorflow as tf

from splitkeras import distribute, experiment, federation, learning_rate
from splitkeras.checkpointing import load_trained
from splitkeras.objective import Objective, metric_names
from splitkeras.parties import Client, Server
from splitkeras.parties.handoff import pack_state, unpack_state
from splitkeras.parties.segment_step import compiled, wire_dtype
from splitkeras.privacy import defenses as privacy_defenses
from splitkeras.progress import write_scalars
from splitkeras.transport import codec as codec_lib
from splitkeras.transport.grpc_client import Connection, TurnRestarted
from splitkeras.transport.grpc_link import GrpcLink
from splitkeras.transport.grpc_server import SplitService, start_server
from splitkeras.transport.sealing import read_key, write_key
from splitkeras.transport.turns import TurnClient

log = logging.getLogger("splitkeras")

__all__ = [
    "RemoteClient",
    "read_key",
    "run_client",
    "serve",
    "serve_predictions",
    "write_key",
]


def _objective(config):
    return Objective(experiment._loss(), metric_names(config))


def grpc_settings(config):
    """`config.grpc`: message size limit, deadlines, retry and turn timeouts."""
    return config.grpc


def _check_supported(config):
    if config.method != "split" or config.topology not in ("vanilla", "ushaped"):
        raise ValueError(
            "over gRPC, splitkeras runs config.method='split' with topology "
            f"'vanilla' or 'ushaped' (round robin); got method={config.method!r}, "
            f"topology={config.topology!r}"
        )


def _codecs(config):
    return codec_lib.codec_pair(config)


def serve(
    config,
    workdir: str,
    address: str = "127.0.0.1:0",
    credentials=None,
    tokens: dict | None = None,
    on_started=None,
) -> dict:
    """Serves `config`'s split until every epoch is trained; returns the summary.

    Args:
      config: the experiment config (`config.grpc` for limits and timeouts).
      workdir: the server's directory: checkpoints (resumed from if present),
        TensorBoard, summary.json, the final server-segment weights.
      address: "host:port" to listen on (port 0: any free port).
      credentials: `grpc.ServerCredentials` (TLS), or None for plaintext.
      tokens: {client id: token}; None accepts any client id (tests only).
      on_started: called with the bound port once the server listens.
    """
    _check_supported(config)
    if config.get("server", {}).get("strategy", "none") == "multi_worker":
        # Only the worker a client calls would enter each step's collectives.
        raise ValueError(
            "config.server.strategy='multi_worker' does not serve gRPC clients "
            "yet (the first worker does not relay their messages to the "
            "others): serve with 'mirrored' on one machine, or run multi_worker "
            "in-process with scripts/train.py on every worker"
        )
    strategy = distribute.make_strategy(config.get("server", {}))  # first
    distribute.check_supported(config, strategy)
    settings = grpc_settings(config)
    tf.io.gfile.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    arrays = experiment.load_data(config)
    segments = experiment.build_segments(config, arrays)
    objective = None if segments.ushaped else _objective(config)
    server = _server_party(config, segments, objective, strategy)
    server.build_optimizer()
    writers = {
        name: tf.summary.create_file_writer(os.path.join(workdir, name))
        for name in ("train", "validation")
    }
    last = {}

    def on_epoch_end(epoch, train, val):
        totals = {k: sum(v) for k, v in service.byte_counts().items()}
        write_scalars(writers["train"], {**train, **totals}, epoch + 1)
        write_scalars(writers["validation"], val, epoch + 1)
        log.info("epoch %d: train %s validation %s", epoch + 1, train, val)
        last["validation"] = val

    up, down = _codecs(config)
    service = SplitService(
        server,
        config.num_clients,
        config.train.epochs,
        os.path.join(workdir, "checkpoints", "server"),
        tokens=tokens,
        codec_up=up,
        codec_down=down,
        turn_timeout=settings["turn_timeout_seconds"],
        on_epoch_end=on_epoch_end,
        run_eagerly=config.train.run_eagerly,
        jit_compile=bool(config.train.get("jit_compile", False)),
        on_turn_begin=lambda epoch: learning_rate.start_epoch(
            config.train, [server.optimizer], epoch
        ),
    )
    grpc_server, port = start_server(
        service, address, credentials, settings["max_message_mb"] << 20
    )
    log.info("Serving on port %d (%d clients)", port, config.num_clients)
    if on_started is not None:
        on_started(port)
    with service._changed:
        while not service.done:
            service._changed.wait(1.0)
    time.sleep(0.5)  # let the last EndTurn reply leave
    service.closed.set()
    grpc_server.stop(grace=2.0).wait()
    server.segment.save_weights(os.path.join(workdir, "server.weights.h5"))
    summary = {
        "method": config.method,
        "topology": config.topology,
        "transport": "grpc",
        "codec_up": up,
        "codec_down": down,
        "num_clients": int(config.num_clients),
        "epochs": int(config.train.epochs),
        "steps": service.position()[2],
        "server_replicas": strategy.num_replicas_in_sync if strategy else 1,
        "wall_seconds": float(service.turns.wall_seconds.numpy()),
        "per_client": service.byte_counts(),
        "skipped_turns": service.skipped,
        "refused_calls": service.refused,
        # Peak resident memory of the server process (Linux reports KiB).
        "server_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    validation = last.get("validation") or {}
    if "accuracy" in validation:
        summary["test_accuracy"] = float(validation["accuracy"])
        summary["test_loss"] = float(validation["loss"])
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def _server_party(config, segments, objective, strategy):
    """The server party, on `strategy`'s devices if given (vanilla only)."""
    if strategy is None:
        return Server(segments.server, experiment._optimizer(config), objective)
    if objective is None:
        raise ValueError(
            "config.server.strategy runs vanilla splits; this run is U-shaped"
        )
    segment = distribute.replicate(segments.server, strategy)
    with strategy.scope():
        optimizer = experiment._optimizer(config)
    return Server(segment, optimizer, objective, strategy=strategy)


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

    Args:
      config: the run's config.
      workdir: the trained server's directory (server.weights.h5, or a
        `scripts/train.py` run's checkpoints/server).
      address, credentials, tokens, on_started: as `serve`.
      stop: an event that ends serving when set (None: never).
    """
    _check_supported(config)
    settings = grpc_settings(config)
    arrays = experiment.load_data(config)
    segments = experiment.build_segments(config, arrays)
    load_trained([segments.server], workdir, "server", "server.weights.h5")
    objective = None if segments.ushaped else _objective(config)
    server = Server(segments.server, experiment._optimizer(config), objective)
    up, down = _codecs(config)
    service = SplitService(
        server,
        config.num_clients,
        epochs=0,
        checkpoint_dir=None,
        tokens=tokens,
        codec_up=up,
        codec_down=down,
        run_eagerly=config.train.run_eagerly,
    )
    grpc_server, port = start_server(
        service, address, credentials, settings["max_message_mb"] << 20
    )
    log.info("Serving predictions on port %d", port)
    if on_started is not None:
        on_started(port)
    try:
        while not (stop is not None and stop.wait(1.0)):
            if stop is None:
                time.sleep(1.0)
    finally:
        service.closed.set()
        grpc_server.stop(grace=1.0).wait()


class RemoteClient(TurnClient):
    """One client of `config`'s split, connected to the server at `target`.

    It loads the dataset and keeps only its own shard (the same partition as
    the in-process run), builds and cuts the model from the config's seed,
    joins the server and compiles its steps (`train_fn`, `eval_fn`): the
    same `Client.train_step` as in-process, over a `GrpcLink`.

    Args:
      config: the experiment config (the server's).
      target: the server's "host:port".
      client_id: this client's id, 0..K-1.
      key: the clients' shared AES-256 handoff key.
      token: this client's token (if the server requires tokens).
      credentials: `grpc.ChannelCredentials` (TLS), or None for plaintext.
      arrays: the loaded dataset (None: load it from the config).
    """

    # A turn's failure inside the compiled step arrives as an op error.
    restart_errors = (TurnRestarted, tf.errors.OpError)

    def __init__(
        self,
        config,
        target: str,
        client_id: int,
        key: bytes,
        token: str | None = None,
        credentials=None,
        arrays=None,
    ):
        _check_supported(config)
        settings = grpc_settings(config)
        self.config = config
        if arrays is None:
            arrays = experiment.load_data(config)
        self.arrays = arrays
        self.shard = federation.client_shards(config, arrays)[client_id]
        self.test_ds = federation.test_data(config, arrays)
        segments = experiment.build_segments(config, arrays)
        objective = _objective(config) if segments.ushaped else None
        self.client = client = Client(
            segments.client,
            experiment._optimizer(config),
            client_id=client_id,
            tail=segments.tail,
            objective=objective,
            privacy=privacy_defenses.from_config(config, client_id),
        )
        client.build_optimizer()
        self._initial = pack_state(client)
        connection = Connection(
            target,
            client_id,
            token=token,
            credentials=credentials,
            max_message_bytes=settings["max_message_mb"] << 20,
            timeout=settings["timeout_seconds"],
            retry_seconds=settings["retry_seconds"],
        )
        up, down = _codecs(config)
        super().__init__(connection, client_id, key, (up, down))
        self.link = link = GrpcLink(
            self.connection,
            [wire_dtype(t.dtype) for t in segments.client.outputs],
            [t.shape for t in segments.client.outputs],
            list(self.info.output_dtypes),
            [t.shape for t in segments.tail.inputs] if segments.ushaped else None,
            ushaped=segments.ushaped,
            codec_up=up,
            codec_down=down,
        )
        self.step = step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.eval_step = eval_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_fn = compiled(
            lambda x, y: client.train_step(link, step.assign_add(1), x, y),
            config.train.run_eagerly,
        )
        self.eval_fn = compiled(
            lambda x, y: client.evaluate_step(link, eval_step.assign_add(1), x, y),
            config.train.run_eagerly,
        )

    @property
    def steps(self) -> int:
        return int(self.step.numpy())

    @steps.setter
    def steps(self, value: int) -> None:
        self.step.assign(value)

    def _load_state(self, plain):
        unpack_state(self.client, self._initial if plain is None else plain)

    def _packed_state(self) -> bytes:
        return pack_state(self.client)

    def _restart_cause(self, error):
        return _cause(error, self.link)

    def run(self) -> dict:
        """Trains this client's turn of every epoch; returns its summary."""
        self.run_turns()
        return self.connection_summary()

    def _train_turn(self, epoch: int, evaluate: bool) -> dict:
        """Trains one turn on the shard; evaluates on the test split if asked."""
        config, objective = self.config, self.client.objective
        if objective is not None:
            objective.reset(training=True)
        # After the handed-on state (which holds the last turn's rate).
        learning_rate.start_epoch(config.train, [self.client.optimizer], epoch)
        dataset = federation.client_dataset(
            config, self.arrays, self.shard, self.client_id, epoch
        )
        for xb, yb in dataset:
            self.train_fn(xb, yb)
        metrics = {}
        if objective is not None:
            logs = objective.result(training=True)
            metrics.update({f"train_{k}": float(v) for k, v in logs.items()})
        if evaluate:
            self.eval_step.assign(0)
            if objective is not None:
                objective.reset(training=False)
            for xb, yb in self.test_ds:
                self.eval_fn(xb, yb)
            if objective is not None:
                logs = objective.result(training=False)
                metrics.update({f"val_{k}": float(v) for k, v in logs.items()})
        return metrics

    def save(self, workdir: str, summary: dict) -> None:
        """Writes the final segment weights and `summary` to `workdir`."""
        tf.io.gfile.makedirs(workdir)
        self.client.segment.save_weights(os.path.join(workdir, "client.weights.h5"))
        if self.client.tail is not None:
            self.client.tail.save_weights(os.path.join(workdir, "tail.weights.h5"))
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)


def run_client(
    config,
    target: str,
    client_id: int,
    key: bytes,
    workdir: str | None = None,
    token: str | None = None,
    credentials=None,
) -> dict:
    """Runs client `client_id` of `config`'s split against the server at `target`.

    Trains its turn of every epoch (the last client of each epoch also
    evaluates on the test split) and writes its final weights and summary to
    `workdir` (if given). Arguments as `RemoteClient`.

    Returns:
      This client's summary: steps, bytes it sent and received, retries,
      restarted turns.
    """
    remote = RemoteClient(config, target, client_id, key, token, credentials)
    summary = remote.run()
    if workdir:
        remote.save(workdir, summary)
    remote.connection.close()
    return summary


def _cause(error, link):
    """The exception behind an op error raised inside the link's round trip."""
    if isinstance(error, tf.errors.OpError) and link.error is not None:
        cause, link.error = link.error, None
        return cause
    return error
