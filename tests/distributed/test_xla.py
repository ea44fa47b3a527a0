"""`config.train.jit_compile` over gRPC: a split client's steps (which hold
their round trip, a py_function) run compiled without XLA and say so, and
the run's weights equal the XLA-compiled run in one process within 1e-5."""

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras import deployment
from splitkeras.client_process import ClientProcess
from splitkeras.transport.turns import yield_all
from tests import base
from tests.distributed.runs import in_process_weights, setup, thread_host, write_npz


class XlaOverGrpcTest(base.TestCase):
    def test_client_steps_run_without_xla_and_train_as_in_process(self):
        root = self.tempdir()
        data = write_npz(os.path.join(root, "data.npz"), 64)
        config, _ = setup(
            data, num_clients=1, **{"train.epochs": 1, "train.jit_compile": True}
        )
        parties, coordinator, _, connect = thread_host(self, config, jit_compile=True)
        with self.assertLogs("splitkeras", "INFO") as logs:
            client = ClientProcess(config, 0, connect, key=AESGCM.generate_key(256))
        self.addCleanup(client.close)
        self.assertTrue(
            any(deployment.NO_XLA_OVER_GRPC % 0 in line for line in logs.output)
        )
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
