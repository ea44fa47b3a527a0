"""Data stays where it belongs: `splitkeras partition` writes each site's file,
each client is started with a folder holding only its own file, and the
hosts run where the dataset does not exist. The run ends with the weights
of the same run in one process over the whole dataset, equal to the bit
(round robin with the peer handoff, and the vertical split: these two
configurations are tested as processes here; round robin with the
clients' hijack guards on, whose probes must match too, and the vertical
one with the server's Marvell-style noise on, whose draws must match
too; its party without the labels measures the leakage of its strip, and
its host the label-leak AUCs of that party's gradients, as the run in one
process does)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from splitkeras import launcher
from tests import base
from tests.distributed.runs import (
    ROOT,
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


class SitesTest(base.TestCase):
    @base.parameterized.named_parameters(
        (
            "round_robin",
            {"privacy.hijack_probe_every": 2, "privacy.hijack_warmup": 2},
        ),
        (
            "vertical",
            {
                "topology": "vertical",
                "privacy.marvell_strength": 1.0,
                "privacy.leakage_examples": 32,
            },
        ),
    )
    def test_clients_hold_only_their_site_and_hosts_no_data(self, overrides):
        root = self.tempdir()
        npz = write_npz(os.path.join(root, "data.npz"), 256)
        config, args = setup(npz, **overrides)
        schedule = in_process(config)  # over the whole dataset
        expected = in_process_weights(config, schedule)
        untrained = in_process(config, train=False)  # to load the results into
        vertical = config.topology == "vertical"
        # What the clients leak, untrained and trained, measured with all of
        # them here.
        leaked, leakage = leakage_of(config, schedule, untrained)

        every = os.path.join(root, "sites")
        written = subprocess.run(
            [sys.executable, "-m", "splitkeras", "partition", *args, f"--out={every}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        self.assertEqual(written.returncode, 0, written.stderr[-3000:])
        line = "256 training rows, no labels" if vertical else "128 training rows"
        self.assertIn(f"client_1.npz: {line}", written.stdout)
        own = {}
        for k in range(config.num_clients):
            folder = os.path.join(root, f"site_{k}")
            os.makedirs(folder)
            shutil.copy(os.path.join(every, f"client_{k}.npz"), folder)
            own[k] = [f"--config.data.sites={folder}"]
        shutil.rmtree(every)
        os.remove(npz)  # no process can read the dataset now

        workdir = os.path.join(root, "run")
        summary = launcher.launch(args, workdir, config, client_flags=own).wait(600)
        self.assertEqual(summary["epochs"], 2)
        processes = processes_weights(config, workdir, untrained)
        assert_same_weights(self, processes, expected)
        if vertical:
            # The host counts a batch once, though every party sends its part:
            # 2 epochs of 256 rows in batches of 32.
            self.assertEqual(summary["steps"], 16)
            # The host measures the label-leak AUCs of the gradients it would
            # send party 1, from the evaluation's cut tensors, as the run in
            # one process does (the Marvell-style noise drawn alike).
            self.assertEqual(
                {k: v for k, v in summary.items() if k.startswith("label_leak")},
                {
                    k: leaked[k]
                    for k in ("label_leak_norm_auc_1", "label_leak_cosine_auc_1")
                },
            )
            # Party 1 (no labels) measures its own strip's leakage as the run
            # in one process does; party 0 (the labels) measures none.
            summaries = []
            for k in range(config.num_clients):
                with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
                    summaries.append(json.load(f))
            own = {
                k: v
                for k, v in summaries[1].items()
                if k.startswith(("leakage", "label_leak"))
            }
            self.assertIn("label_leak_norm_auc_1", leaked)
            self.assertEqual(
                own,
                {
                    "leakage_dcor_1": leaked["leakage_dcor_1"],
                    "leakage_dcor_change_1": leaked["leakage_dcor_change_1"],
                    "leakage_dcor_start_1": leakage.starts[1],
                },
            )
            self.assertEqual(summaries[1]["privacy_warnings"], [])
            self.assertEqual(
                [k for k in summaries[0] if k.startswith(("leakage", "label_leak"))],
                [],
            )
        else:
            # The last client evaluates, and reports its cut's leakage.
            self.assertEqual(summary["leakage_dcor"], leaked["leakage_dcor"])
            # Each client process reports its guard's score as the same
            # client in one process has it (probes at steps 2, 4, 6).
            for client in schedule.clients:
                k = client.client_id
                with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
                    reported = json.load(f)
                key = "hijack_score" + (f"_{k}" if k else "")
                self.assertEqual(reported[key], client.privacy.guard.score())
            # What each client sent and received, counted at its gRPC
            # connections (framing included), is within 2% of what the
            # in-process transports count.
            counted = processes_client_bytes(config, workdir)
            computed = client_bytes(schedule.byte_counts())
            for measured, wanted in zip(counted, computed):
                np.testing.assert_allclose(measured, wanted, rtol=0.02)
