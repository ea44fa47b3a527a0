"""The LiteRT edge client against the Keras client, on real Fashion-MNIST.

Every run is a server process (`splitkeras serve`) and client processes over
gRPC on 127.0.0.1, from the same seed and config:

- `keras`: one Keras client (`splitkeras client`);
- `edge`: one edge client (`splitkeras edge-client`, in the environment
  without TensorFlow, `make edge`), its segment exported untrained from the
  same seed;
- `mixed`: two clients taking turns, client 0 Keras and client 1 edge: the
  segment state is handed between TensorFlow and LiteRT through the server.

Reports each run's test accuracy (the server's summary), wall time and, for
the edge client, how far its per-step losses are from a Keras client trained
in-process on the same batches.

  python benchmarks/edge_training.py [--epochs=1] [--runs=keras,edge,mixed]
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from splitkeras import builders, client_data, launcher  # noqa: E402
from splitkeras import data as data_lib  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402
from splitkeras.edge import EdgeSpec  # noqa: E402
from splitkeras.edge.client import batches  # noqa: E402
from splitkeras.export import export_segment  # noqa: E402
from splitkeras.objective import Objective  # noqa: E402
from splitkeras.parties import Client, Server  # noqa: E402
from splitkeras.transport.local import LocalTransport  # noqa: E402

_EPOCHS = flags.DEFINE_integer("epochs", 1, "Epochs of each run.")
_RUNS = flags.DEFINE_list("runs", ["keras", "edge", "mixed"], "Runs to make.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/edge_training", "Output root.")
_EDGE_PYTHON = flags.DEFINE_string(
    "edge_python",
    os.path.join(ROOT, ".venv-edge", "bin", "python"),
    "Python of the environment without TensorFlow.",
)


def _config(num_clients, epochs):
    config = fashion_mnist_lenet.get_config()
    config.num_clients = num_clients
    config.train.epochs = epochs
    args = [
        "--config=fashion_mnist_lenet",
        f"--config.num_clients={num_clients}",
        f"--config.train.epochs={epochs}",
    ]
    return config, args


def _export(config, arrays, out):
    segments = builders.build_segments(config, arrays)
    export_segment(segments.client, builders.make_optimizer(config), out, quantize=())
    EdgeSpec.from_config(config, segments, 0).write(os.path.join(out, "edge.json"))
    return os.path.join(out, "client.tflite")


def _reference_losses(config, arrays):
    """Per-step losses of client 0 trained in-process (Keras, LocalTransport)."""
    segments = builders.build_segments(config, arrays)
    objective = Objective(builders.make_loss(), ("accuracy",))
    server = Server(segments.server, builders.make_optimizer(config), objective)
    client = Client(segments.client, builders.make_optimizer(config))
    transport = LocalTransport(server)
    step_fn = tf.function(
        lambda s, x, y: client.train_step(transport, s, x, y), reduce_retracing=True
    )
    (site,) = client_data.sites(config, arrays)
    shard = (site.x_train, site.y_train)
    losses = []
    for epoch in range(config.train.epochs):
        for x, y in batches(*shard, config.train.batch_size, config.seed, epoch, 0):
            step = tf.constant(len(losses) + 1, tf.int64)  # a tensor: one trace
            losses.append(float(step_fn(step, x, y)))
    return losses


def _edge_client(model, port, k, workdir, key):
    log = open(os.path.join(workdir, f"client_{k}.log"), "ab")
    return subprocess.Popen(
        [
            _EDGE_PYTHON.value,
            "-m",
            "splitkeras",
            "edge-client",
            f"--model={model}",
            f"--server=127.0.0.1:{port}",
            f"--client_id={k}",
            f"--key_file={key}",
            f"--summary={os.path.join(workdir, f'edge_{k}.json')}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def _run(name, kinds, epochs, arrays):
    config, args = _config(len(kinds), epochs)
    workdir = os.path.abspath(os.path.join(_WORKDIR.value, name))
    os.makedirs(workdir, exist_ok=True)
    # Every client's handoff key in its own secrets folder (the launcher's
    # layout, which the Keras clients read).
    launcher.client_secrets(workdir, len(kinds))
    key = os.path.join(launcher.secrets_dir(workdir, 0), launcher.KEY_FILE)
    model = _export(config, arrays, os.path.join(workdir, "export"))
    started = time.monotonic()
    server, port = launcher.start_host(args, workdir, "server")
    clients = []
    for k, kind in enumerate(kinds):
        if kind == "edge":
            clients.append(_edge_client(model, port, k, workdir, key))
        else:
            connect = {"server": f"127.0.0.1:{port}"}
            clients.append(launcher.start_client(args, workdir, k, connect))
    for proc in clients:
        if proc.wait() != 0:
            server.kill()
            raise RuntimeError(f"a client of run {name} failed; see {workdir}")
    server.wait()
    wall = time.monotonic() - started
    with open(os.path.join(workdir, "server", "summary.json")) as f:
        summary = json.load(f)
    result = {
        "run": name,
        "clients": kinds,
        "test_accuracy": summary.get("test_accuracy"),
        "steps": summary["steps"],
        "wall_seconds": wall,
    }
    edge_path = os.path.join(workdir, "edge_0.json")
    if os.path.exists(edge_path):
        with open(edge_path) as f:
            edge = json.load(f)
        reference = _reference_losses(config, arrays)
        diff = np.abs(np.asarray(edge["losses"]) - np.asarray(reference))
        result.update(
            edge_tensorflow_imported=edge["tensorflow_imported"],
            loss_steps=len(diff),
            loss_max_abs_diff_first_100=float(diff[:100].max()),
            loss_max_abs_diff=float(diff.max()),
            loss_mean_last_100_edge=float(np.mean(edge["losses"][-100:])),
            loss_mean_last_100_keras=float(np.mean(reference[-100:])),
        )
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    config, _ = _config(1, _EPOCHS.value)
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    kinds = {"keras": ["keras"], "edge": ["edge"], "mixed": ["keras", "edge"]}
    results = [_run(r, kinds[r], _EPOCHS.value, arrays) for r in _RUNS.value]
    for r in results:
        print(json.dumps(r))
    with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
