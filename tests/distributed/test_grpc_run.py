"""Server and clients as separate processes over gRPC on 127.0.0.1.

The final weights must equal the in-process round-robin run with the same
config (same seed, codec float32), also when the server is killed with
SIGKILL and restarted from its workdir, or a client is killed and restarted.
"""

import json
import os
import signal
import socket
import time

import numpy as np
import tensorflow as tf

from configs import fashion_mnist_lenet
from splitkeras import builders, federation, launcher, learning_rate
from splitkeras import data as data_lib
from splitkeras.cut import cut
from splitkeras.privacy.leakage import attach_privacy
from tests import base


def _write_npz(path, n_train, n_test=64):
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)

    def images(labels):
        x = (
            rng.integers(0, 90, (len(labels), 28, 28, 1))
            + 80 * labels[:, None, None, None]
        )
        return x.astype(np.uint8)

    np.savez(
        path,
        x_train=images(y_train),
        y_train=y_train,
        x_test=images(y_test),
        y_test=y_test,
    )
    return path


STEP_DECAY = {
    "train.lr_schedule": "step",
    "train.lr_decay_epochs": "1",
    "train.lr_decay_factor": 0.5,
}


def _setup(data_path, **overrides):
    """(config, command-line config args) with the same overrides."""
    c = fashion_mnist_lenet.get_config()
    settings = {
        "data.path": data_path,
        "num_clients": 2,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.eval_batch_size": 64,
        "train.learning_rate": 0.01,
        **overrides,
    }
    args = ["--config=configs/fashion_mnist_lenet.py"]
    for key, value in settings.items():
        node = c
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
        args.append(f"--config.{key}={value}")
    return c, args


def _in_process(config):
    """Trains the in-process round robin; returns (server, last client) segments."""
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    schedule = builders.build_schedule(config, arrays)
    attach_privacy(schedule, config)
    shards = federation.client_shards(config, arrays)
    for epoch in range(config.train.epochs):
        learning_rate.start_epoch(config.train, schedule.optimizers, epoch)
        schedule.train_epoch(federation._epoch_datasets(config, arrays, shards, epoch))
    client = schedule.clients[schedule.active]
    return schedule.server.segment, client


def _loaded(config, workdir, last_client):
    """The segments the processes wrote, loaded into fresh copies."""
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    segments = cut(builders.build_model(config, arrays), builders.cut_layers(config))
    segments.server.load_weights(os.path.join(workdir, "server", "server.weights.h5"))
    client_dir = os.path.join(workdir, f"client_{last_client}")
    segments.client.load_weights(os.path.join(client_dir, "client.weights.h5"))
    if segments.tail is not None:
        segments.tail.load_weights(os.path.join(client_dir, "tail.weights.h5"))
    return segments


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoints(workdir):
    directory = os.path.join(workdir, "server", "checkpoints", "server")
    found = tf.train.get_checkpoint_state(directory)
    if found is None:
        return 0
    return int(found.model_checkpoint_path.rsplit("-", 1)[1])


class GrpcRunTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = os.path.join(os.environ["TMPDIR"], "grpc_run")
        os.makedirs(cls.root, exist_ok=True)
        cls.small = _write_npz(os.path.join(cls.root, "small.npz"), 256)
        cls.large = _write_npz(os.path.join(cls.root, "large.npz"), 1024)

    def assertSameAsInProcess(self, config, workdir):
        server, client = _in_process(config)
        loaded = _loaded(config, workdir, config.num_clients - 1)
        self.assertWeightsClose(loaded.server.get_weights(), server.get_weights())
        self.assertWeightsClose(
            loaded.client.get_weights(), client.segment.get_weights()
        )
        if client.tail is not None:
            self.assertWeightsClose(
                loaded.tail.get_weights(), client.tail.get_weights()
            )

    def _run(self, name, **overrides):
        config, args = _setup(self.small, **overrides)
        workdir = os.path.join(self.root, name)
        summary = launcher.launch(args, workdir, config.num_clients).wait(600)
        return config, workdir, summary

    def test_vanilla_equals_in_process(self):
        # A rate that halves after the first epoch: both ends follow it.
        config, workdir, summary = self._run("vanilla", **STEP_DECAY)
        self.assertEqual(summary["steps"], 16)  # 2 epochs x 2 clients x 4 batches
        self.assertEqual(summary["refused_calls"], 0)
        self.assertEqual(summary["skipped_turns"], [])
        for key in ("bytes_up", "bytes_down"):
            self.assertTrue(all(b > 0 for b in summary["per_client"][key]))
        with open(os.path.join(workdir, "client_1", "summary.json")) as f:
            client = json.load(f)
        # Both ends count the same Exchange bytes; the client adds turn calls.
        self.assertGreater(client["bytes_sent"], summary["per_client"]["bytes_up"][1])
        self.assertSameAsInProcess(config, workdir)

    def test_ushaped_with_nopeek_equals_in_process(self):
        # NoPeek's dCor term joins the client's objective in both runs.
        config, workdir, summary = self._run(
            "ushaped",
            **{
                "topology": "ushaped",
                "model.cut": "pool1,fc2",
                "privacy.nopeek_alpha": 0.5,
            },
        )
        self.assertEqual(summary["steps"], 16)
        self.assertIn("test_accuracy", summary)
        self.assertSameAsInProcess(config, workdir)
        # NoPeek was on: without it the client segment ends elsewhere.
        config.privacy.nopeek_alpha = 0.0
        _, plain = _in_process(config)
        loaded = _loaded(config, workdir, 1)
        diff = max(
            abs(a - b).max()
            for a, b in zip(loaded.client.get_weights(), plain.segment.get_weights())
        )
        self.assertGreater(diff, 1e-4)

    def _killed(self, name, victim):
        """Kills `victim` ("server" or "client_1") mid-run, restarts it."""
        config, args = _setup(self.large, **{"train.epochs": 3, "train.batch_size": 8})
        workdir = os.path.join(self.root, name)
        os.makedirs(workdir, exist_ok=True)
        port = _free_port()
        launcher.write_key(os.path.join(workdir, "handoff.key"))
        server, _ = launcher.start_server(args, workdir, port)
        clients = {
            f"client_{k}": launcher.start_client(args, workdir, port, k)
            for k in range(2)
        }
        run = launcher.Launch(server, clients, workdir)
        try:
            deadline = time.monotonic() + 300
            while _checkpoints(workdir) < 3:  # 3 turns done: inside the 4th
                self.assertLess(time.monotonic(), deadline, "run did not progress")
                time.sleep(0.02)
            if victim == "server":
                server.send_signal(signal.SIGKILL)
                server.wait()
                run.server, _ = launcher.start_server(args, workdir, port)
            else:
                clients[victim].send_signal(signal.SIGKILL)
                clients[victim].wait()
                clients[victim] = launcher.start_client(
                    args, workdir, port, int(victim[-1])
                )
            summary = run.wait(600)
        finally:
            run.kill()
        self.assertEqual(summary["steps"], 3 * 2 * 64)
        self.assertSameAsInProcess(config, workdir)
        return workdir

    def test_server_killed_and_restarted_loses_no_step(self):
        workdir = self._killed("server_killed", "server")
        restarted = 0
        for k in range(2):
            with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
                summary = json.load(f)
            restarted += summary["restarted_turns"] + summary["retries"]
        self.assertGreater(restarted, 0)

    def test_client_killed_and_restarted_loses_no_step(self):
        self._killed("client_killed", "client_1")
