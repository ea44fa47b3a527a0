"""Every configuration as separate processes over gRPC (`splitkeras launch`'s
launcher: one generic host per host of the layout, one process per client)
ends with the weights of the same run in one process, equal to the bit,
the host's summary counts the steps that run counts, and (each
configuration with a cut) it has the leakage_dcor of that run's client in
one process, from the client that evaluates."""

import json
import os

import numpy as np

from splitkeras import host_process, launcher
from splitkeras.checkpointing import CheckpointMismatch
from tests import base
from tests.distributed.runs import (
    assert_same_weights,
    client_bytes,
    in_process,
    in_process_weights,
    leakage_of,
    processes_client_bytes,
    processes_weights,
    setup,
    write_npz,
)

# Split learning and SplitFed: the clients' bytes on the wire are checked
# against the computed bytes too.
BYTES_CHECKED = ("split", "splitfed_v1", "splitfed_v2")
# Clients that train the whole model: no cut, no leakage figure.
WHOLE_MODEL = ("fedavg", "large_batch_sgd")

# Round robin with the peer handoff and the vertical split run as processes
# in tests/distributed/test_sites.py (each client with only its own site).
CONFIGURATIONS = {
    "round_robin_server_handoff": {"weight_handoff": "server"},
    "ushaped_nopeek": {
        "topology": "ushaped",
        "model.cut": "pool1,fc2",
        "privacy.nopeek_alpha": 0.1,
    },
    "splitfed_v1": {"method": "splitfed_v1"},
    "splitfed_v1_fed_process": {"method": "splitfed_v1", "splitfed.fed_process": True},
    # NoPeek too: its normalized step over gRPC gives the same weights.
    "splitfed_v2": {"method": "splitfed_v2", "privacy.nopeek_alpha": 0.1},
    # U-shaped SplitFed: every server copy (v1) and the ordered server (v2)
    # run their steps paused between TRAIN and OUTPUT_GRADIENTS.
    "splitfed_v1_ushaped": {
        "method": "splitfed_v1",
        "topology": "ushaped",
        "model.cut": "pool1,fc2",
    },
    # v2 with the fed server in its own process too.
    "splitfed_v2_ushaped_fed_process": {
        "method": "splitfed_v2",
        "topology": "ushaped",
        "model.cut": "pool1,fc2",
        "splitfed.fed_process": True,
    },
    "fedavg": {"method": "fedavg"},
    "large_batch_sgd": {"method": "large_batch_sgd"},
    "multihop": {
        "topology": "multihop",
        "model.cut": "pool1,pool2",
        "num_clients": 1,
        "privacy.nopeek_alpha": 0.1,
    },
    "multitask": {
        "topology": "multitask",
        "num_clients": 1,
        "multitask.groups": "0,0,1",
        "model.cut": "fc2",
    },
    # Micro-batches in flight and a client one step ahead of its gradients
    # (SGD: also within 1e-5 of unpipelined steps, see
    # tests/schedules/test_pipelining.py).
    "pipelined_async": {
        "train.microbatches": 4,
        "train.max_staleness": 1,
        "train.optimizer": "sgd",
        "train.learning_rate": 0.05,
    },
}


class ConfigurationsOverGrpcTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.npz = write_npz(os.path.join(base.TestCase().tempdir(), "small.npz"), 256)

    @base.parameterized.named_parameters(
        (name, overrides) for name, overrides in CONFIGURATIONS.items()
    )
    def test_processes_equal_in_process(self, overrides):
        config, args = setup(self.npz, **overrides)
        workdir = os.path.join(self.tempdir(), "run")
        summary = launcher.launch(args, workdir, config).wait(600)
        self.assertEqual(summary["epochs"], 2)
        processes = processes_weights(config, workdir)
        schedule = in_process(config)
        assert_same_weights(self, processes, in_process_weights(config, schedule))
        # The host counts the steps the run in one process counts (FedAvg
        # and large-batch SGD: each client's, as it ends its round).
        self.assertEqual(summary["steps"], schedule.run_steps)
        if config.method not in WHOLE_MODEL:
            # The client that evaluates measures its cut's leakage as the
            # run in one process does, and reports it to the host.
            leaked, _ = leakage_of(config, schedule)
            self.assertEqual(summary["leakage_dcor"], leaked["leakage_dcor"])
        if overrides == CONFIGURATIONS["round_robin_server_handoff"]:
            # Started again on its finished workdir, the host returns the
            # run's summary at once and leaves it as it was.
            path = os.path.join(workdir, "server", "summary.json")
            with open(path) as f:
                written = f.read()
            again = host_process.serve(config, os.path.join(workdir, "server"))
            self.assertEqual(again, json.loads(written))
            self.assertIn("test_accuracy", again)
            with open(path) as f:
                self.assertEqual(f.read(), written)
            # Started with a setting its commits do not fit (the server's
            # last layer: 5 classes, not 3), it stops before serving, names
            # the setting, and keeps the record of the run's own settings.
            host_dir = os.path.join(workdir, "server")
            with open(os.path.join(host_dir, "config.json")) as f:
                settings = f.read()
            changed = config.copy_and_resolve_references()
            changed.data.num_classes = 5
            with self.assertRaises(CheckpointMismatch) as raised:
                host_process.serve(changed, host_dir)
            self.assertRegex(
                str(raised.exception),
                f"^server: cannot resume the run in {host_dir}: {host_dir}/"
                "checkpoints/server/ckpt-[0-9]+ does not fit this run: Received "
                "incompatible tensor with shape",
            )
            self.assertEndsWith(
                str(raised.exception),
                f"\nSettings changed since it was started ({host_dir}/config.json):"
                "\n  data.num_classes: 3 -> 5\nResume it with the settings it "
                "was started with (more train.epochs is fine), or train in a "
                "new workdir.",
            )
            with open(os.path.join(host_dir, "config.json")) as f:
                self.assertEqual(f.read(), settings)
        if config.train.microbatches > 1:
            # M micro-batches per step over gRPC: within 1e-5 of unpipelined
            # steps (M = 1, the same staleness).
            one, _ = setup(self.npz, **{**overrides, "train.microbatches": 1})
            for name, weights in in_process_weights(one).items():
                self.assertWeightsClose(processes[name], weights, atol=1e-5)
        if config.method in BYTES_CHECKED and config.topology == "vanilla":
            # What each client sent and received, counted at its gRPC
            # connections (every message, framing included), is within 2% of
            # what the in-process transports count (tensors, labels, states).
            counted = processes_client_bytes(config, workdir)
            computed = client_bytes(schedule.byte_counts())
            for measured, expected in zip(counted, computed):
                np.testing.assert_allclose(measured, expected, rtol=0.02)
            # The host's summary has what it counted of each client's
            # activations up and gradients down, within 2% too.
            for name in ("bytes_up", "bytes_down"):
                np.testing.assert_allclose(
                    summary["per_client"][name],
                    schedule.byte_counts()[name],
                    rtol=0.02,
                    err_msg=name,
                )
