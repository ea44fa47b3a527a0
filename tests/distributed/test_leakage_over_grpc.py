"""Privacy figures of a run over gRPC: the evaluating client measures its
cut's leakage as the same run in one process does (the same leakage_dcor,
in the host's validation figures, and the same start figure, NoPeek warning
and adapted NoPeek alpha in its summary; the hijack guard's score in its
summary, never in what the host receives), and the run ends with the same
reconstruction attack on its segment; the host, which has the accuracy,
warns of a run left near chance. Round robin with two clients and U-shaped
report the same leakage_dcor (U-shaped: and label-leak AUCs) as in process,
from the client that evaluates (SplitFed's clients, in threads of one
process, would hold every inter-op thread while they wait: every
configuration's leakage_dcor is checked as processes in
test_configurations.py)."""

import os
import threading

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras import builders, learning_rate
from splitkeras.client_process import ClientProcess
from splitkeras.experiment import InProcess
from splitkeras.host_process import HostProcess, hijack_inputs
from splitkeras.privacy.leakage import attach_privacy, images_of, near_chance_warning
from splitkeras.studies.hijacking import hijack
from splitkeras.transport.turns import yield_all
from tests import base
from tests.distributed.runs import setup, thread_host, write_npz


def _in_process(config):
    """The run in one process: (its InProcess, round 0's validation figures)."""
    arrays = builders.load_data(config)
    schedule = builders.build_schedule(config, arrays)
    attach_privacy(schedule, config)
    local = InProcess(config, schedule, arrays)
    learning_rate.start_epoch(config.train, schedule.optimizers, 0)
    yield_all(local.round(0))
    return local, local.logs(0)[1]


def _over_grpc(test, config):
    """Every client of the run over gRPC, each in a thread of its own:
    (clients, round 0's figures as the host received them)."""
    _, coordinator, _, connect = thread_host(test, config)
    key = AESGCM.generate_key(256)
    clients = [
        ClientProcess(config, k, connect, key=key) for k in range(config.num_clients)
    ]
    for client in clients:
        test.addCleanup(client.close)
    errors = []

    def train(client):
        try:
            yield_all(client.round(0))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=train, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    test.assertEqual([t for t in threads if t.is_alive()], [], "a round never ended")
    test.assertEqual(errors, [])
    return clients, coordinator.logs[0][1]


class LeakageOverGrpcTest(base.TestCase):
    def test_configurations_report_the_in_process_leakage(self):
        root = self.tempdir()
        data = write_npz(os.path.join(root, "data.npz"), 64)
        cases = {
            "round robin, 2 clients": (
                {"num_clients": 2, "weight_handoff": "server"},
                1,
            ),
            "U-shaped": (
                {"num_clients": 1, "topology": "ushaped", "model.cut": "pool1,fc2"},
                0,
            ),
        }
        for name, (overrides, evaluating) in cases.items():
            with self.subTest(name):
                config, _ = setup(
                    data,
                    **{
                        "train.epochs": 1,
                        "privacy.nopeek_alpha": 0.1,
                        "privacy.leakage_examples": 32,
                        **overrides,
                    },
                )
                _, expected = _in_process(config)
                clients, reported = _over_grpc(self, config)
                keys = ["leakage_dcor", "leakage_dcor_change"]
                if config.topology == "ushaped":  # the host's outputs (PREDICT)
                    keys += ["label_leak_norm_auc", "label_leak_cosine_auc"]
                for key in keys:
                    self.assertEqual(reported[key], expected[key], key)
                for k, client in enumerate(clients):
                    summary = client.summary({})
                    if k == evaluating:
                        self.assertEqual(
                            summary["leakage_dcor"], expected["leakage_dcor"]
                        )
                    else:
                        self.assertNotIn("leakage_dcor", summary)

    def test_the_evaluating_client_measures_as_in_process(self):
        root = self.tempdir()
        data = write_npz(os.path.join(root, "data.npz"), 64)
        config, _ = setup(
            data,
            num_clients=1,
            **{
                "train.epochs": 1,
                "privacy.nopeek_alpha": 0.1,
                # Alpha adapts toward a target it does not reach.
                "privacy.nopeek_target": 0.01,
                "privacy.nopeek_adapt": 0.5,
                "privacy.leakage_examples": 32,
                "privacy.reconstruction_examples": 32,
                "privacy.reconstruction_epochs": 1,
                # The guard probes step 2 (no alarm at this threshold): its
                # figures must stay with the client.
                "privacy.hijack_probe_every": 2,
                "privacy.hijack_warmup": 1,
                "privacy.hijack_probes": 1,
                "privacy.hijack_threshold": 1e-6,
                "privacy.hijack_freeze": False,
            },
        )
        local, expected = _in_process(config)
        expected_attack = local.attacks(os.path.join(root, "in_process"), 2)

        _, coordinator, host, connect = thread_host(self, config)
        client = ClientProcess(config, 0, connect, key=AESGCM.generate_key(256))
        self.addCleanup(client.close)
        yield_all(client.round(0))
        _, reported = coordinator.logs[0]
        self.assertIn("hijack_score", expected)  # the guard has probed
        self.assertEqual([k for k in reported if k.startswith("hijack_")], [])
        self.assertEqual(reported["leakage_dcor"], expected["leakage_dcor"])
        self.assertEqual(
            reported["leakage_dcor_change"], expected["leakage_dcor_change"]
        )
        self.assertGreater(expected["nopeek_adapted_alpha"], 0.1)
        self.assertEqual(
            reported["nopeek_adapted_alpha"], expected["nopeek_adapted_alpha"]
        )
        summary = client.summary({})
        self.assertEqual(
            summary["nopeek_adapted_alpha"], expected["nopeek_adapted_alpha"]
        )
        self.assertEqual(summary["leakage_dcor_start"], local.leakage.start)
        self.assertEqual(summary["leakage_dcor"], expected["leakage_dcor"])
        self.assertEqual(summary["hijack_score"], expected["hijack_score"])
        # Two steps from alpha 0.1 do not move dCor by 10%: the user is told.
        self.assertEqual(summary["privacy_warnings"], local.leakage.warnings)
        self.assertEqual(len(summary["privacy_warnings"]), 1)
        self.assertIn("NoPeek is on", summary["privacy_warnings"][0])
        attack = client.attacks(os.path.join(root, "grpc"), 2)
        self.assertEqual(sorted(attack), ["reconstruction_mse", "reconstruction_ssim"])
        self.assertEqual(attack, expected_attack)
        self.assertTrue(
            os.path.exists(os.path.join(root, "grpc", "reconstructions.png"))
        )
        client.finish()
        # The host has the accuracy: it warns of a run left near chance
        # (3 classes: below 0.5), as a run in one process does.
        process = HostProcess(config, host)
        near = process.summary({"accuracy": 0.4, "loss": 1.0})
        self.assertEqual(near["privacy_warnings"], near_chance_warning(0.4, 3, 0.1))
        self.assertIn("left the model near chance", near["privacy_warnings"][0])
        self.assertNotIn(
            "privacy_warnings", process.summary({"accuracy": 0.9, "loss": 0.3})
        )


class HijackingHostTest(base.TestCase):
    def test_the_guard_alarms_over_grpc_at_the_in_process_step(self):
        """A hijacking host, built as `splitkeras serve --hijack` builds it
        (`hijack_inputs`, `deployment.hosted_parties`), against a client
        whose guard probes: the alarm goes off at the same step as against
        the hijacker in one process, with the same score (a U-shaped
        hijacker answers eagerly on a host, in the client's graph in one
        process: within 1e-5), and a vanilla hijacking host has no accuracy
        of its own; an honest host raises no alarm."""
        root = self.tempdir()
        data = write_npz(os.path.join(root, "data.npz"), 32 * 25)  # 25 steps
        guard = {
            "train.epochs": 1,
            "privacy.hijack_probe_every": 5,
            "privacy.hijack_warmup": 10,
            "privacy.hijack_probes": 3,
            "privacy.hijack_freeze": False,  # trains on: the same steps
        }
        cases = {
            "vanilla": ({}, True),
            "U-shaped": ({"topology": "ushaped", "model.cut": "pool1,fc2"}, True),
            "vanilla, an honest host": ({}, False),
        }
        for name, (overrides, hijacking) in cases.items():
            with self.subTest(name):
                config, _ = setup(data, num_clients=1, **guard, **overrides)
                public = hijack_inputs(config, data, 256)  # serve --hijack's
                _, coordinator, host, connect = thread_host(
                    self, config, hijack_inputs=public if hijacking else None
                )
                client = ClientProcess(config, 0, connect, key=AESGCM.generate_key(256))
                self.addCleanup(client.close)
                yield_all(client.round(0))
                summary = client.summary({})  # what the client's user reads
                hosts = HostProcess(config, host).summary({})
                self.assertEqual(
                    hosts.get("hijacker"),
                    {"public_inputs": 256} if hijacking else None,
                )
                if config.topology == "vanilla" and hijacking:
                    self.assertNotIn("accuracy", coordinator.logs[0][1])
                    self.assertEqual(
                        hosts["test_figures"], "none: a hijacking host trains no task"
                    )
                if not hijacking:  # the host's own accuracy
                    self.assertIn("accuracy", coordinator.logs[0][1])
                if not hijacking:
                    self.assertNotIn("hijack_alarm_step", summary)
                    self.assertGreater(summary["hijack_lowest_score"], 1.5)
                    self.assertEqual(summary["privacy_warnings"], [])
                    continue
                arrays = builders.load_data(config)
                held_out = images_of(arrays.x_test[:8], arrays.y_test[:8])
                expected = hijack(config, arrays, public, held_out, 25, 25)
                self.assertIsNotNone(expected["alarm_step"])
                self.assertEqual(summary["hijack_alarm_step"], expected["alarm_step"])
                self.assertAlmostEqual(
                    summary["hijack_score"],
                    expected["score"],
                    delta=0 if config.topology == "vanilla" else 1e-5,
                )
                self.assertEqual(len(summary["privacy_warnings"]), 1)
                self.assertIn(
                    f"since step {expected['alarm_step']}",
                    summary["privacy_warnings"][0],
                )
