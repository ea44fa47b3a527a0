"""A server on two workers (MultiWorkerMirroredStrategy, two processes on this
machine talking over localhost) equals the one-device server."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests import base
from tests.distribute.test_mirrored_server import _in_process
from tests.distributed.runs import setup as _setup
from tests.distributed.runs import write_npz as _write_npz

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
        got = [np.load(os.path.join(root, f"worker_{i}.npz")) for i in range(2)]
        for i in range(2):
            self.assertEqual(int(got[i]["replicas"]), 2)
            self.assertAlmostEqual(float(got[i]["accuracy"]), test["accuracy"], 6)
            for key, value in expected.items():
                np.testing.assert_allclose(got[i][key], value, atol=1e-5, err_msg=key)
        # The workers hold the same weights, to the bit.
        for key in expected:
            np.testing.assert_array_equal(got[1][key], got[0][key], err_msg=key)


class _Resolver:
    def __init__(self, task_type, task_id, jobs):
        self.task_type, self.task_id, self._jobs = task_type, task_id, jobs

    def cluster_spec(self):
        import tensorflow as tf

        return tf.train.ClusterSpec({job: ["h:1"] for job in self._jobs})


class _Strategy:
    def __init__(self, *resolver):
        self.cluster_resolver = _Resolver(*resolver) if resolver else None


class WorkerWorkdirTest(base.TestCase):
    def test_only_the_chief_writes_into_the_workdir(self):
        from splitkeras.distribute import worker_workdir

        cases = [
            ((), "run"),  # one process
            (("worker", 0, ["worker"]), "run"),  # worker 0 is the chief
            (("worker", 1, ["worker"]), "run/worker_1"),
            (("chief", 0, ["chief", "worker"]), "run"),
            (("worker", 0, ["chief", "worker"]), "run/worker_0"),
        ]
        for resolver, expected in cases:
            self.assertEqual(worker_workdir(_Strategy(*resolver), "run"), expected)
        self.assertEqual(worker_workdir(None, "run"), "run")

    def test_worker_index_names_the_chief_zero(self):
        from splitkeras.distribute import worker_index

        self.assertIsNone(worker_index(None))
        self.assertIsNone(worker_index(_Strategy()))
        self.assertEqual(worker_index(_Strategy("worker", 0, ["worker"])), 0)
        self.assertEqual(worker_index(_Strategy("worker", 1, ["worker"])), 1)
        with self.assertRaisesRegex(ValueError, "worker 0 is the chief"):
            worker_index(_Strategy("chief", 0, ["chief", "worker"]))

    def test_only_other_workers_follow(self):
        from splitkeras import host_process

        config, _ = _setup("unused.npz")
        with self.assertRaisesRegex(
            ValueError,
            "--chief is for the other workers .* this process is not one of them",
        ):
            host_process.follow(config, self.tempdir(), "127.0.0.1:1")


class MultiWorkerOverGrpcTest(base.TestCase):
    def test_two_workers_behind_grpc_equal_one_device(self):
        """The launcher's two-worker server (the chief serving two client
        processes over TLS, the other worker following it over TLS) trains
        what one device trains; both workers end with the same weights.
        (The server hands the clients' sealed weights on: a client's peer
        inbox serves no TLS yet.)"""
        from splitkeras import launcher
        from tests.distributed.runs import in_process_weights, processes_weights

        root = self.tempdir()
        data = _write_npz(os.path.join(root, "data.npz"), 96)
        settings = {
            "train.epochs": 1,
            "train.learning_rate": 0.01,
            "weight_handoff": "server",
        }
        one_device, _ = _setup(data, **settings)
        config, args = _setup(
            data, **settings, **{"server.strategy": "multi_worker", "server.workers": 2}
        )
        workdir = os.path.join(root, "run")
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        names = ["server", "server_worker_1", "client_0", "client_1"]
        run = launcher.launch(
            args, workdir, config, tls=True, envs=dict.fromkeys(names, env)
        )
        summary = run.wait(600)
        self.assertEqual(summary["server_replicas"], 2)
        # One of its processes alone is not started again (it would run as a
        # one-worker server, or wait for the others' collective ops).
        with self.assertRaisesRegex(RuntimeError, "processes restart together"):
            run.restart("server")
        expected = in_process_weights(one_device)
        processes = processes_weights(one_device, workdir)
        self.assertEqual(sorted(processes), sorted(expected))
        for name, weights in expected.items():
            self.assertWeightsClose(processes[name], weights, atol=1e-5)
        follower = os.path.join(workdir, "server", "worker_1")
        with open(os.path.join(follower, "summary.json")) as f:
            followed = json.load(f)
        # Every training step, and the evaluation batches, ran on both.
        self.assertGreater(followed["mirrored_steps"], summary["steps"])
        self.assertEqual(followed["mirrored_failed_steps"], 0)
        self.assertEqual(followed["mirrored_rollbacks"], 0)
        server = processes["server/server"]
        model = _server_segment(one_device)
        model.load_weights(os.path.join(follower, "server.weights.h5"))
        self.assertWeightsClose(model.get_weights(), server, atol=0.0)


def _server_segment(config):
    from splitkeras import builders
    from splitkeras.cut import cut

    return cut(builders.model_builder(config)(), builders.cut_layers(config)).server
