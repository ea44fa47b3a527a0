"""What keeps two hosts apart: one port, one workdir each."""

import os

from splitkeras.host_process import lock_workdir
from splitkeras.transport.grpc_host import GrpcHost, start_host
from tests import base


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
