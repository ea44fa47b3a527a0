"""The edge client: an exported LiteRT segment, in an environment without
TensorFlow, trains against a splitkeras server process and serves split
inference; its losses equal a Keras client's.

The edge environment is `make edge` (.venv-edge: `pip install -e .[edge]`),
named by SPLITKERAS_EDGE_PYTHON (`make test` sets it).
"""

import json
import os
import subprocess

import numpy as np

from splitkeras import builders, client_data, launcher
from splitkeras import data as data_lib
from splitkeras.edge import EdgeSpec
from splitkeras.edge.client import batches
from splitkeras.export import export_segment
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.transport.local import LocalTransport
from splitkeras.transport.sealing import write_key
from tests import base
from tests.distributed.runs import setup as _setup
from tests.distributed.runs import write_npz as _write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EDGE_PYTHON = os.environ.get(
    "SPLITKERAS_EDGE_PYTHON", os.path.join(ROOT, ".venv-edge", "bin", "python")
)
# LiteRT and TensorFlow compute the same float32 ops in different orders
# (~1e-7 relative per op); over 6 steps the losses stay within this.
LOSS_TOLERANCE = 1e-4


def _keras_run(config, arrays):
    """(losses per step, client segment, server segment) of a Keras client
    trained in-process on client 0's batches, in the edge client's order."""
    segments = builders.build_segments(config, arrays)
    objective = Objective(builders.make_loss(), ("accuracy",))
    server = Server(segments.server, builders.make_optimizer(config), objective)
    client = Client(segments.client, builders.make_optimizer(config))
    transport = LocalTransport(server)
    (site,) = client_data.sites(config, arrays)
    shard = (site.x_train, site.y_train)
    losses, step = [], 0
    for epoch in range(config.train.epochs):
        for x, y in batches(*shard, config.train.batch_size, config.seed, epoch, 0):
            step += 1
            losses.append(float(client.train_step(transport, step, x, y)))
    return losses, segments.client, segments.server


class EdgeClientTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if not os.path.exists(EDGE_PYTHON):
            raise AssertionError(
                f"no edge environment at {EDGE_PYTHON}: run `make edge` "
                "(make test does)"
            )
        cls.root = os.path.join(os.environ["TMPDIR"], "edge")
        os.makedirs(cls.root, exist_ok=True)
        data = _write_npz(os.path.join(cls.root, "data.npz"), 96)
        cls.config, cls.config_args = _setup(data, num_clients=1)
        cls.arrays = data_lib.load(
            cls.config.data.name, cls.config.data.path, cls.config.data.download
        )

    def _edge(self, *args, check=True):
        return subprocess.run(
            [EDGE_PYTHON, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            check=check,
        )

    def test_edge_environment_has_no_tensorflow(self):
        result = self._edge("-c", "import tensorflow", check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("No module named 'tensorflow'", result.stderr)
        result = self._edge("-c", "import ai_edge_litert, grpc, splitkeras.edge")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_batches_follow_the_keras_pipeline(self):
        x, y = self.arrays.x_train[:70], self.arrays.y_train[:70]
        expected = data_lib.train_dataset(x, y, 32, seed=3, epoch=1, stream=2)
        got = list(batches(x, y, 32, seed=3, epoch=1, stream=2))
        self.assertEqual(len(got), 3)
        for (xe, ye), (xg, yg) in zip(expected, got):
            np.testing.assert_array_equal(xe.numpy(), xg)
            np.testing.assert_array_equal(ye.numpy(), yg)

    def test_trains_against_a_server_and_predicts(self):
        config, workdir = self.config, os.path.join(self.root, "run")
        os.makedirs(workdir, exist_ok=True)
        # The untrained client segment (the run's seed) goes to the device.
        segments = builders.build_segments(config, self.arrays)
        export = os.path.join(workdir, "export")
        export_segment(
            segments.client, builders.make_optimizer(config), export, quantize=()
        )
        EdgeSpec.from_config(config, segments, 0).write(
            os.path.join(export, "edge.json")
        )
        key = os.path.join(workdir, "handoff.key")
        write_key(key)

        server, port = launcher.start_host(self.config_args, workdir, "server")
        try:
            result = self._edge(
                "-m",
                "splitkeras",
                "edge-client",
                f"--model={export}/client.tflite",
                f"--server=127.0.0.1:{port}",
                "--client_id=0",
                f"--key_file={key}",
                f"--summary={workdir}/edge.json",
                f"--save_state={workdir}/trained.npz",
            )
            self.assertEqual(server.wait(timeout=120), 0)
        finally:
            if server.poll() is None:
                server.kill()
        with open(os.path.join(workdir, "edge.json")) as f:
            edge = json.load(f)
        with open(os.path.join(workdir, "server", "summary.json")) as f:
            summary = json.load(f)
        self.assertFalse(edge["tensorflow_imported"], result.stdout)
        self.assertEqual(edge["steps"], 6)  # 2 epochs x 96 examples / 32
        self.assertEqual(summary["steps"], 6)
        self.assertIn("test_accuracy", summary)  # the edge client evaluated

        losses, client_segment, server_segment = _keras_run(config, self.arrays)
        self.assertEqual(len(edge["losses"]), len(losses))
        np.testing.assert_allclose(edge["losses"], losses, atol=LOSS_TOLERANCE)
        self.assertGreater(losses[0] - losses[-1], 0.05)  # it did learn

        # Split inference: the trained edge segment + the trained server.
        server, port = launcher.start_host(
            self.config_args, workdir, "server", tls_args=["--predict"]
        )
        try:
            self._edge(
                "-m",
                "splitkeras",
                "predict",
                f"--model={export}/client.tflite",
                f"--state={workdir}/trained.npz",
                f"--server=127.0.0.1:{port}",
                "--batch_size=8",
                "--batches=4",
                "--warmup=1",
                f"--summary={workdir}/predict.json",
                f"--logits={workdir}/logits.npy",
            )
        finally:
            server.kill()
            server.wait()
        with open(os.path.join(workdir, "predict.json")) as f:
            predict = json.load(f)
        # Every batch sent counts for the accuracy; the warm-up one is not timed.
        self.assertEqual((predict["batches"], predict["examples"]), (4, 32))
        self.assertEqual(predict["timed_batches"], 3)
        self.assertFalse(predict["tensorflow_imported"])
        self.assertGreater(predict["total_ms_p50"], 0)
        x = self.arrays.x_test[:32].astype(np.float32) / np.float32(255.0)
        expected = server_segment(client_segment(x, training=False), training=False)
        logits = np.load(os.path.join(workdir, "logits.npy"))
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-3)
        correct = np.argmax(logits, axis=-1) == self.arrays.y_test[:32]
        self.assertEqual(predict["accuracy"], np.mean(correct))
