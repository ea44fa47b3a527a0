"""A server on two workers (MultiWorkerMirroredStrategy, two processes on this
machine talking over localhost) equals the one-device server."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests import base
from tests.distribute.test_mirrored_server import _in_process
from tests.distributed.test_grpc_run import _setup, _write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class MultiWorkerTest(base.TestCase):
    def test_two_workers_equal_one_device(self):
        root = self.tempdir()
        data = _write_npz(os.path.join(root, "data.npz"), 128)
        ports = ",".join(str(p) for p in _free_ports(2))
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.distribute.multi_worker_run",
                    str(i),
                    ports,
                    data,
                    os.path.join(root, f"worker_{i}.npz"),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]
        for worker in workers:
            output, _ = worker.communicate(timeout=300)
            self.assertEqual(worker.returncode, 0, output.decode()[-3000:])
        config, _ = _setup(data, **{"train.epochs": 1, "train.learning_rate": 0.01})
        server, client, test = _in_process(config, None)
        expected = {
            **{f"server_{i}": w for i, w in enumerate(server.segment.get_weights())},
            **{f"client_{i}": w for i, w in enumerate(client.segment.get_weights())},
        }
        for i in range(2):
            got = np.load(os.path.join(root, f"worker_{i}.npz"))
            self.assertEqual(int(got["replicas"]), 2)
            self.assertAlmostEqual(float(got["accuracy"]), test["accuracy"], 6)
            for key, value in expected.items():
                np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=key)
