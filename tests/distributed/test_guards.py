"""What keeps two hosts apart: one port, one workdir each."""

import os
import signal
import subprocess
import sys

from splitkeras.host_process import lock_workdir
from splitkeras.transport.grpc_host import GrpcHost, start_host
from tests import base
from tests.distributed.runs import ROOT


class GuardsTest(base.TestCase):
    def test_a_second_server_on_a_port_in_use_is_refused(self):
        host = GrpcHost({"server": object()}, 1)
        first, port = start_host(host, "127.0.0.1:0")
        self.addCleanup(lambda: (host.closed.set(), first.stop(grace=None).wait()))
        with self.assertRaisesRegex(
            OSError,
            f"could not bind the server to 127.0.0.1:{port}: is another server "
            "listening there",
        ):
            start_host(host, f"127.0.0.1:{port}")

    def test_a_second_host_on_a_workdir_in_use_is_refused(self):
        workdir = os.path.join(self.tempdir(), "server")
        held = lock_workdir(workdir)
        with self.assertRaisesRegex(
            RuntimeError,
            f"{workdir} is in use by pid {os.getpid()}: two hosts cannot share",
        ):
            lock_workdir(workdir)
        held.close()  # released (as when its process ends): taken again
        lock_workdir(workdir).close()

    def test_a_workdir_held_by_a_crashed_host_is_taken_again(self):
        workdir = os.path.join(self.tempdir(), "server")
        # Another process holds the workdir, until it is SIGKILLed.
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from splitkeras.host_process import lock_workdir\n"
                "lock = lock_workdir(sys.argv[1])\n"
                "print('held', flush=True)\n"
                "time.sleep(600)\n",
                workdir,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline(), "held\n")
        with self.assertRaisesRegex(
            RuntimeError, f"{workdir} is in use by pid {holder.pid}: two hosts"
        ):
            lock_workdir(workdir)
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup of its own
        holder.wait(60)
        lock_workdir(workdir).close()


class ConfigFingerprintTest(base.TestCase):
    def test_a_client_with_another_config_is_refused_at_join(self):
        import json

        import grpc

        from splitkeras.configs import fashion_mnist_lenet
        from splitkeras.deployment import FINGERPRINT_FIELDS, config_fingerprint
        from splitkeras.transport.grpc_client import Connection, RemoteError
        from splitkeras.transport.proto import wire_pb2

        config = fashion_mnist_lenet.get_config()
        mine = config_fingerprint(config)
        self.assertEqual(sorted(mine), sorted(FINGERPRINT_FIELDS))
        self.assertNotIn("None", mine.values())  # every field exists
        host = GrpcHost({"server": object()}, 2, info={"config": mine})
        server, port = start_host(host, "127.0.0.1:0")
        self.addCleanup(lambda: (host.closed.set(), server.stop(grace=None).wait()))
        connection = Connection(f"127.0.0.1:{port}", 1, retry_seconds=0)
        self.addCleanup(connection.close)

        def join(fingerprint):
            request = wire_pb2.JoinRequest(client_id=1, config=fingerprint)
            return connection.call("Join", request, wire_pb2.JoinReply)

        self.assertEqual(join(json.dumps(mine)).num_clients, 2)
        config.seed, config.train.batch_size = 1, 32
        with self.assertRaises(RemoteError) as refused:
            join(json.dumps(config_fingerprint(config)))
        self.assertEqual(
            (refused.exception.code, refused.exception.details),
            (
                grpc.StatusCode.FAILED_PRECONDITION,
                "client 1's config differs from this host's: seed=1 (here 0); "
                "train.batch_size=32 (here 64): start both from the same config",
            ),
        )
        with self.assertRaises(RemoteError) as refused:
            join("[1, 2")
        self.assertEqual(refused.exception.code, grpc.StatusCode.INVALID_ARGUMENT)


class MaxStepsOverGrpcTest(base.TestCase):
    def test_every_entry_point_refuses_max_steps_before_starting(self):
        """Over gRPC every process trains whole rounds: config.train.max_steps
        is refused (it was ignored), before a process, port or workdir is
        taken (each entry point's first such step is replaced by one that
        fails the test, so a missing check fails at once)."""
        from unittest import mock

        from splitkeras import client_process, host_process, launcher
        from splitkeras.configs import fashion_mnist_lenet

        config = fashion_mnist_lenet.get_config()
        config.train.max_steps = 5
        workdir = os.path.join(self.tempdir(), "run")
        message = (
            "config.train.max_steps=5 stops a run in one process \\(splitkeras "
            "train\\); over gRPC the hosts and clients train whole rounds: set "
            "config.train.epochs instead"
        )
        started = AssertionError("started before the check")
        cases = {
            "launch": (
                mock.patch.object(launcher, "client_secrets", side_effect=started),
                lambda: launcher.launch([], workdir, config),
            ),
            "serve": (
                mock.patch.object(host_process, "lock_workdir", side_effect=started),
                lambda: host_process.serve(config, workdir),
            ),
            "client": (
                mock.patch.object(client_process, "ClientProcess", side_effect=started),
                lambda: client_process.run_client(config, 0, {}, None, workdir),
            ),
        }
        for name, (patch, start) in cases.items():
            with self.subTest(name), patch:
                with self.assertRaisesRegex(ValueError, message):
                    start()
                self.assertFalse(os.path.exists(workdir))
