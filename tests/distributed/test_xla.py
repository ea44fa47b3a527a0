"""`config.train.jit_compile` over gRPC: a split client's steps (which hold
their round trip, a py_function) run compiled without XLA and say so, and
the run's weights equal the XLA-compiled run in one process within 1e-5."""

import os
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras import deployment
from splitkeras.client_process import ClientProcess
from splitkeras.transport.grpc_host import GrpcHost, start_host
from splitkeras.transport.turns import yield_all
from tests import base
from tests.distributed.runs import in_process_weights, setup, write_npz


class XlaOverGrpcTest(base.TestCase):
    def test_client_steps_run_without_xla_and_train_as_in_process(self):
        root = self.tempdir()
        data = write_npz(os.path.join(root, "data.npz"), 64)
        config, _ = setup(
            data, num_clients=1, **{"train.epochs": 1, "train.jit_compile": True}
        )
        parties, coordinator, state = deployment.hosted_parties(
            config, "server", {}, None, clock=time.monotonic
        )
        host = GrpcHost(
            parties,
            1,
            state=state,
            coordinator=coordinator,
            info={"schedule": deployment.schedule_name(config), "epochs": 1},
            jit_compile=True,
        )
        server, port = start_host(host, "127.0.0.1:0")
        self.addCleanup(lambda: (host.closed.set(), server.stop(grace=None).wait()))
        connect = {"server": f"127.0.0.1:{port}"}
        if True:
            client = ClientProcess(config, 0, connect, key=AESGCM.generate_key(256))
        pass  # TMP
        yield_all(client.round(0))  # 2 steps; an XLA client step fails here
        self.assertTrue(coordinator.done)
        expected = in_process_weights(config)
        self.assertWeightsClose(
            client.program.client.segment.get_weights(),
            expected["client_0/client"],
        )
        self.assertWeightsClose(
            parties["server"].segment.get_weights(), expected["server/server"]
        )
        client.finish()
