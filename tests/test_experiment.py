"""End to end: train_and_evaluate on a tiny synthetic dataset."""

import json
import math
import os
import shutil

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras import experiment
from splitkeras.checkpointing import CheckpointMismatch
from splitkeras.configs import fashion_mnist_lenet
from tests import base


def _write_npz(path):
    rng = np.random.default_rng(0)
    # Two easy classes: bright vs dark images, so accuracy can rise.
    y_train, y_test = rng.integers(0, 2, 256), rng.integers(0, 2, 64)

    def images(labels):
        x = (
            rng.integers(0, 100, (len(labels), 28, 28, 1))
            + 120 * labels[:, None, None, None]
        )
        return x.astype(np.uint8)

    x_train, x_test = images(y_train), images(y_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _config(data_path, **train):
    c = fashion_mnist_lenet.get_config()
    c.data.path = data_path
    c.train.epochs = 2
    c.train.batch_size = 32  # 8 steps per epoch
    c.train.eval_batch_size = 64
    c.train.log_every_seconds = 0.0
    c.train.checkpoint_every_steps = 3
    c.train.learning_rate = 1e-2
    for key, value in train.items():
        setattr(c.train, key, value)
    return c


def _final_variables(workdir):
    found = {}
    for party in ("client_0", "server", "model"):
        directory = os.path.join(workdir, "checkpoints", party)
        if not os.path.isdir(directory):
            continue
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(directory))
        for name in reader.get_variable_to_shape_map():
            if name.startswith("variables/") or "/_variables/" in name:
                found[f"{party}/{name}"] = reader.get_tensor(name)
    return found


def _learning_rates(workdir) -> dict:
    """{party: its optimizer's learning rate} in the newest checkpoints."""
    root = os.path.join(workdir, "checkpoints")
    rates = {}
    for party in sorted(os.listdir(root)):
        reader = tf.train.load_checkpoint(
            tf.train.latest_checkpoint(os.path.join(root, party))
        )
        name = "optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE"
        rates[party] = round(float(reader.get_tensor(name)), 9)
    return rates


def _scalars(workdir, tag) -> dict:
    """{step: value} of a scalar in workdir/train's TensorBoard events."""
    return {
        event.step: round(float(tf.make_ndarray(v.tensor)), 9)
        for path in tf.io.gfile.glob(os.path.join(workdir, "train", "events*"))
        for event in tf.compat.v1.train.summary_iterator(path)
        for v in event.summary.value
        if v.tag == tag
    }


class ExperimentTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tf.io.gfile.join(os.environ["TMPDIR"], "experiment_test")
        tf.io.gfile.makedirs(cls.root)
        cls.npz = _write_npz(os.path.join(cls.root, "tiny.npz"))
        cls.full = os.path.join(cls.root, "full")
        cls.summary = experiment.train_and_evaluate(_config(cls.npz), cls.full)

    def test_workdir_contents_and_summary(self):
        for name in ("config.json", "summary.json", "train", "validation"):
            self.assertTrue(os.path.exists(os.path.join(self.full, name)), name)
        for party in ("client_0", "server"):
            self.assertIsNotNone(
                tf.train.latest_checkpoint(
                    os.path.join(self.full, "checkpoints", party)
                )
            )
        with open(os.path.join(self.full, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary, self.summary)
        self.assertEqual(summary["steps"], 16)
        self.assertGreater(summary["wall_seconds"], 0)
        self.assertGreater(summary["test_accuracy"], 0.9)
        # 16 steps of 32 examples, 14x14x6 float32 cut tensor + int64 label up,
        # plus 2 evaluations (one per epoch; the last is the final test) of 64.
        per_example_up = 14 * 14 * 6 * 4 + 8
        self.assertEqual(summary["bytes_up"], (16 * 32 + 2 * 64) * per_example_up)
        self.assertEqual(summary["per_client"]["bytes_up"], [summary["bytes_up"]])
        with open(os.path.join(self.full, "config.json")) as f:
            self.assertEqual(json.load(f)["model"]["cut"], "pool1")

    def test_a_finished_run_reports_again(self):
        workdir = os.path.join(self.tempdir(), "finished")
        shutil.copytree(self.full, workdir)
        again = experiment.train_and_evaluate(_config(self.npz), workdir)
        self.assertEqual(again["steps"], 16)  # no step more
        for field in ("test_loss", "test_accuracy", "leakage_dcor"):
            self.assertEqual(again[field], self.summary[field], field)

    def test_tensorboard_events_have_the_scalars(self):
        tags = set()
        for sub in ("train", "validation"):
            for path in tf.io.gfile.glob(os.path.join(self.full, sub, "events*")):
                for event in tf.compat.v1.train.summary_iterator(path):
                    tags |= {f"{sub}/{v.tag}" for v in event.summary.value}
        for tag in (
            "train/loss",
            "train/accuracy",
            "train/steps_per_second",
            "train/bytes_up",
            "train/bytes_down",
            "validation/accuracy",
            "validation/loss",
            "validation/bytes_up",
            "validation/leakage_dcor",
            "validation/leakage_dcor_change",
        ):
            self.assertIn(tag, tags)

    def test_killed_run_resumes_to_the_same_weights(self):
        workdir = os.path.join(self.root, "resumed")
        first = experiment.train_and_evaluate(_config(self.npz, max_steps=5), workdir)
        self.assertEqual(first["steps"], 5)  # stopped mid-epoch, like a kill
        second = experiment.train_and_evaluate(_config(self.npz), workdir)
        self.assertEqual(second["steps"], 16)
        full, resumed = _final_variables(self.full), _final_variables(workdir)
        self.assertEqual(sorted(full), sorted(resumed))
        for name in full:
            np.testing.assert_allclose(
                resumed[name], full[name], atol=1e-6, err_msg=name
            )
        self.assertAlmostEqual(second["test_loss"], self.summary["test_loss"], places=5)
        # Byte counters are checkpointed with the client: the resumed run
        # reports the same traffic as the uninterrupted one.
        for key in ("bytes_up", "bytes_down"):
            self.assertEqual(second[key], self.summary[key], key)

    def test_a_resume_with_state_the_checkpoint_lacks_names_the_changes(self):
        workdir = os.path.join(self.tempdir(), "changed")
        shutil.copytree(self.full, workdir)
        with open(os.path.join(workdir, "config.json")) as f:
            started = f.read()
        config = _config(self.npz)
        config.train.epochs = 3
        # Alpha that adapts is a variable of the client's checkpoint.
        config.privacy.nopeek_alpha = 0.5
        config.privacy.nopeek_target = 0.5
        config.privacy.nopeek_adapt = 0.01
        with self.assertRaises(CheckpointMismatch) as raised:
            experiment.train_and_evaluate(config, workdir)
        path = os.path.join(workdir, "config.json")
        client = os.path.join(workdir, "checkpoints", "client_0", "ckpt-16")
        self.assertStartsWith(
            str(raised.exception),
            f"cannot resume the run in {workdir}: {client} does not fit this run: "
            "Found 1 Python objects that were not bound to checkpointed values",
        )
        self.assertEndsWith(
            str(raised.exception),
            f"\nSettings changed since it was started ({path}):\n"
            "  privacy.nopeek_adapt: 0.0 -> 0.01\n"
            "  privacy.nopeek_alpha: 0.0 -> 0.5\n"
            "  privacy.nopeek_target: 0.0 -> 0.5\n"
            "  train.epochs: 2 -> 3\n"
            "Resume it with the settings it was started with (more "
            "train.epochs is fine), or train in a new workdir.",
        )
        with open(path) as f:  # still the record of the run's own settings
            self.assertEqual(f.read(), started)
        for name in ("train", "validation"):  # no new TensorBoard events
            self.assertEqual(
                sorted(os.listdir(os.path.join(workdir, name))),
                sorted(os.listdir(os.path.join(self.full, name))),
            )

    def test_max_steps_is_refused_where_runs_train_whole_epochs(self):
        config = _config(self.npz, max_steps=3)
        config.num_clients = 2
        config.method = "splitfed_v1"
        with self.assertRaisesRegex(
            ValueError, "config.train.max_steps=3 stops a run mid-round"
        ):
            experiment.train_and_evaluate(config, os.path.join(self.root, "steps"))

    def test_round_robin_resumes_mid_turn(self):
        # Stopped in client 1's turn of the first round (4 steps per turn).
        config = _config(self.npz, max_steps=6)
        config.num_clients = 2
        workdir = os.path.join(self.root, "rr_mid_turn")
        self.assertEqual(experiment.train_and_evaluate(config, workdir)["steps"], 6)
        config.train.max_steps = 0
        resumed = experiment.train_and_evaluate(config, workdir)
        full = experiment.train_and_evaluate(
            config, os.path.join(self.root, "rr_mid_turn_full")
        )
        self.assertEqual(resumed["steps"], 16)
        self.assertEqual(resumed["test_loss"], full["test_loss"])
        self.assertEqual(resumed["per_client"], full["per_client"])

    def test_learning_rate_schedule_survives_a_resume(self):
        decay = {"lr_schedule": "step", "lr_decay_epochs": "1", "lr_decay_factor": 0.5}
        workdir = os.path.join(self.root, "decay_resumed")
        experiment.train_and_evaluate(_config(self.npz, max_steps=11, **decay), workdir)
        experiment.train_and_evaluate(_config(self.npz, **decay), workdir)
        full = os.path.join(self.root, "decay_full")
        experiment.train_and_evaluate(_config(self.npz, **decay), full)
        expected, resumed = _final_variables(full), _final_variables(workdir)
        for name in expected:
            np.testing.assert_allclose(resumed[name], expected[name], atol=1e-6)
        # 1e-2 x 0.5 in the client's and the server's optimizer.
        self.assertEqual(_learning_rates(full), {"client_0": 5e-3, "server": 5e-3})
        self.assertEqual(_learning_rates(workdir), _learning_rates(full))
        # Different weights than the constant rate's run.
        constant = _final_variables(self.full)
        self.assertTrue(
            any(np.abs(constant[k] - v).max() > 1e-4 for k, v in expected.items())
        )

    def test_centralized_matches_split(self):
        workdir = os.path.join(self.root, "centralized")
        config = _config(self.npz)
        config.method = "centralized"
        summary = experiment.train_and_evaluate(config, workdir)
        self.assertEqual(summary["bytes_up"], 0)
        self.assertAlmostEqual(
            summary["test_loss"], self.summary["test_loss"], places=4
        )
        self.assertEqual(summary["test_accuracy"], self.summary["test_accuracy"])

    def test_ushaped_config_trains(self):
        config = _config(self.npz)
        config.model.cut = "pool1, fc2"
        config.topology = "ushaped"
        summary = experiment.train_and_evaluate(config, os.path.join(self.root, "u"))
        self.assertGreater(summary["test_accuracy"], 0.9)

    def test_cut_must_match_topology(self):
        config = _config(self.npz)
        config.model.cut = "pool1,fc2"
        with self.assertRaisesRegex(
            ValueError, r"config.topology='vanilla' needs 1 cut layer\(s\)"
        ):
            experiment.train_and_evaluate(config, os.path.join(self.root, "topo"))

    def test_round_robin_clients_resume_and_report_per_client_bytes(self):
        # With a rate that halves at epoch 1: the resumed run must set it too.
        config = _config(
            self.npz, lr_schedule="step", lr_decay_epochs="1", lr_decay_factor=0.5
        )
        config.num_clients = 2
        config.weight_handoff = "server"
        workdir = os.path.join(self.root, "rr")
        config.train.epochs = 1
        first = experiment.train_and_evaluate(config, workdir)
        config.train.epochs = 2
        second = experiment.train_and_evaluate(config, workdir)  # resumes
        uninterrupted = experiment.train_and_evaluate(
            config, os.path.join(self.root, "rr_full")
        )
        self.assertEqual(second["test_loss"], uninterrupted["test_loss"])
        self.assertEqual(second["per_client"], uninterrupted["per_client"])
        self.assertGreater(second["test_accuracy"], 0.9)
        per_client = second["per_client"]
        self.assertLen(per_client["bytes_up"], 2)
        self.assertEqual(sum(per_client["bytes_up"]), second["bytes_up"])
        # Epoch 1: 0 -> 1; epoch 2: 1 -> 0 and 0 -> 1.
        self.assertEqual(first["per_client"]["handoff_bytes_received"][0], 0)
        self.assertGreater(uninterrupted["per_client"]["handoff_bytes_received"][0], 0)
        for party in ("client_0", "client_1", "server"):
            self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", party)))
        flops = _scalars(workdir, "client_tflops")
        self.assertEqual(_scalars(workdir, "learning_rate"), {1: 1e-2, 2: 5e-3})
        self.assertEqual(
            _learning_rates(workdir),
            {"client_0": 5e-3, "client_1": 5e-3, "server": 5e-3},
        )
        # Cumulative client FLOPs, logged by epoch 1 and by the resumed epoch 2.
        self.assertGreater(flops[1], 0)
        self.assertAlmostEqual(flops[2] / flops[1], 2.0, places=5)

    @parameterized.parameters("fedavg", "large_batch_sgd")
    def test_federated_baselines_from_config(self, method):
        config = _config(self.npz)
        config.method = method
        config.num_clients = 2
        summary = experiment.train_and_evaluate(config, os.path.join(self.root, method))
        self.assertTrue(np.isfinite(summary["test_loss"]))
        # LeNet-5 with 2 classes: 61026 float32 parameters per model transfer.
        model_bytes = 61026 * 4
        # fedavg: 2 rounds, one model each way; large-batch SGD: 2 x 4 steps
        # per client, gradients up and the model down each step.
        transfers = 2 if method == "fedavg" else 2 * 4
        expected = [transfers * model_bytes] * 2
        self.assertEqual(summary["per_client"]["bytes_up"], expected)
        if method == "large_batch_sgd":
            # Client 0 evaluates: it fetches each round's final model too.
            expected[0] += 2 * model_bytes
        self.assertEqual(summary["per_client"]["bytes_down"], expected)

    @parameterized.parameters("splitfed_v1", "splitfed_v2")
    def test_splitfed_from_config(self, method):
        config = _config(self.npz)
        config.method = method
        config.num_clients = 2
        summary = experiment.train_and_evaluate(config, os.path.join(self.root, method))
        self.assertEqual(summary["steps"], 16)
        self.assertTrue(np.isfinite(summary["test_loss"]))
        # Client segment of LeNet-5 up to pool1: 6 * (5 * 5 + 1) float32 weights,
        # sent up and received back once per round.
        per_client = summary["per_client"]
        self.assertEqual(per_client["aggregation_bytes_sent"], [2 * 156 * 4] * 2)

    def test_multihop_from_config(self):
        config = _config(self.npz)
        config.topology = "multihop"
        config.model.cut = "pool1,fc1"
        summary = experiment.train_and_evaluate(config, os.path.join(self.root, "mh"))
        self.assertAlmostEqual(
            summary["test_loss"], self.summary["test_loss"], places=5
        )
        self.assertEqual(summary["test_accuracy"], self.summary["test_accuracy"])

    def test_multitask_from_config(self):
        config = _config(self.npz)
        config.topology = "multitask"
        config.model.cut = "fc2"
        config.multitask.groups = "0,1"  # the second task: the class again
        summary = experiment.train_and_evaluate(config, os.path.join(self.root, "mt"))
        tasks = summary["test_tasks"]
        self.assertEqual(summary["test_accuracy"], tasks["task_0/accuracy"])
        self.assertGreater(tasks["task_1/accuracy"], 0.9)
        # fc2's 84 float32 go to each head with that head's int64 labels.
        per_link = (16 * 32 + 2 * 64) * (84 * 4 + 8)
        self.assertEqual(summary["task_1/bytes_up"], per_link)
        self.assertEqual(summary["bytes_up"], 2 * per_link)

    def test_vertical_halves_from_config(self):
        config = _config(self.npz)
        config.topology = "vertical"
        config.num_clients = 2
        summary = experiment.train_and_evaluate(config, os.path.join(self.root, "v"))
        self.assertEqual(summary["steps"], 16)
        self.assertGreater(summary["test_accuracy"], 0.9)
        # Each client sends its half's cut tensor (14x7x6 float32) and ids.
        per_example = 14 * 7 * 6 * 4 + 8
        up = summary["per_client"]["bytes_up"]
        self.assertEqual(up[1], (16 * 32 + 2 * 64) * per_example)
        self.assertGreater(up[0], up[1])  # client 0 also sends the labels
        self.assertNotIn("leakage_dcor", summary)  # each client sees a strip
        # Per party without the labels: its strip's dCor, its gradients' AUCs.
        for key in (
            "leakage_dcor_1",
            "label_leak_norm_auc_1",
            "label_leak_cosine_auc_1",
        ):
            self.assertGreaterEqual(summary[key], 0.0)
            self.assertLessEqual(summary[key], 1.0)
        self.assertNotIn("leakage_dcor_0", summary)  # the label owner's
        # NoPeek acts on every vertical client: the run trains differently.
        config.privacy.nopeek_alpha = 2.0
        nopeek = experiment.train_and_evaluate(config, os.path.join(self.root, "vn"))
        self.assertNotEqual(nopeek["test_loss"], summary["test_loss"])
        self.assertTrue(math.isfinite(nopeek["test_loss"]))

    def test_non_finite_loss_stops_the_run(self):
        config = _config(self.npz, optimizer="sgd", learning_rate=1e30)
        with self.assertRaisesRegex(
            experiment.NonFiniteLossError,
            r"training loss is (nan|inf) at step \d+ \(epoch 0\); lower "
            r"config.train.learning_rate",
        ):
            experiment.train_and_evaluate(config, os.path.join(self.root, "nan"))

    def test_unknown_method_is_refused(self):
        config = _config(self.npz)
        config.method = "carrier_pigeon"
        with self.assertRaisesRegex(
            ValueError, r"unknown config.method 'carrier_pigeon'"
        ):
            experiment.train_and_evaluate(config, os.path.join(self.root, "bad"))
