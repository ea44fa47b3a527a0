"""Feature-space hijacking and the client's hijack guard."""

import json
import os
import types

import keras
import numpy as np
import tensorflow as tf

from splitkeras import deployment
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.privacy.attacks.hijacking import FeatureSpaceHijacker
from splitkeras.privacy.defenses import ClientPrivacy, from_config
from splitkeras.privacy.hijack_guard import HijackGuard, hijack_warning
from splitkeras.privacy.leakage import Leakage
from splitkeras.protocol import Kind, Message
from splitkeras.studies.attack_table import ROWS, attack_table
from splitkeras.studies.privacy_report import (
    attack_sets,
    completion_accuracy,
    restore_client_segment,
    restore_server_segment,
)
from splitkeras.transport.local import LocalTransport
from tests import base
from tests.test_experiment import _write_npz


def _images(n, seed):
    """Two classes of 8x8 images: the bright half is the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.random((n, 8, 8, 1)).astype("float32") * 0.3
    for i, label in enumerate(y):
        x[i, :, 4 * label : 4 * label + 4] += 0.7
    return x, y.astype("int64")


def _segments():
    return cut(_model(), "conv")


def _loss():
    return Objective(keras.losses.SparseCategoricalCrossentropy(from_logits=True), [])


class _LabelBlind:
    """A server whose gradients are the same whatever the labels."""

    def handle(self, message):
        grads = 1e-4 * tf.ones_like(message.tensors[0])
        return Message(Kind.GRADIENTS, 0, message.step, (grads,), loss=0.0)


class GuardTest(base.TestCase):
    def _guard(self):
        return HijackGuard(probe_every=3, warmup=2, threshold=1.5, probes=2)

    def _record(self, guard, probe_norm):
        """One step of 8 examples: gradients of norm 1, `probe_norm` for the
        examples whose labels a probe rotated."""
        probe = guard.is_probe()
        _, rows = guard.labels(tf.range(8, dtype=tf.int64), probe)
        norms = tf.where(rows, probe_norm, 1.0)
        guard.record(probe, [tf.stack([norms, tf.zeros(8)], axis=1)], rows)
        return bool(probe)

    def test_probes_come_every_n_steps_after_the_warmup(self):
        guard = self._guard()
        probes = [self._record(guard, 3.0) for _ in range(9)]
        self.assertEqual(
            [i for i, p in enumerate(probes) if p], [2, 5, 8]
        )  # warmup 2, then every 3rd

    def test_honest_ratios_raise_no_alarm(self):
        guard = self._guard()
        for _ in range(9):
            self._record(guard, 3.0)
        self.assertAlmostEqual(guard.score(), 3.0, places=5)
        self.assertAlmostEqual(guard.lowest_score(), 3.0, places=5)
        self.assertIsNone(guard.alarm())
        self.assertEqual(guard.warnings(), [])

    def test_label_independent_gradients_raise_the_alarm_and_it_stays(self):
        guard = self._guard()
        for _ in range(6):  # probes at steps 2 and 5: both at ratio 1
            self._record(guard, 1.0)
        self.assertEqual(guard.alarm(), 6)
        for _ in range(6):  # honest again: the score recovers, the alarm stays
            self._record(guard, 3.0)
        self.assertAlmostEqual(guard.score(), 3.0, places=5)
        self.assertEqual(guard.alarm(), 6)
        self.assertEqual(guard.warnings(), [hijack_warning(6, guard.score(), 1.5, 2)])

    def test_the_run_logs_the_score_and_the_alarm_and_warns(self):
        guard = self._guard()
        for _ in range(6):
            self._record(guard, 1.0)
        clients = [types.SimpleNamespace(client_id=0, privacy=None)]
        clients.append(
            types.SimpleNamespace(
                client_id=1, privacy=types.SimpleNamespace(guard=guard)
            )
        )
        config = fashion_mnist_lenet.get_config()
        config.privacy.leakage_examples = 0
        leakage = Leakage(config, types.SimpleNamespace(x_test=np.zeros((0, 1))))
        with self.assertLogs("splitkeras", "WARNING") as logs:
            figures = leakage(types.SimpleNamespace(clients=clients))
        self.assertEqual(
            figures,
            {
                "hijack_score_1": 1.0,
                "hijack_lowest_score_1": 1.0,
                "hijack_alarm_step_1": 6,
            },
        )
        warning = hijack_warning(6, 1.0, 1.5, 2)
        self.assertEqual(logs.output, [f"WARNING:splitkeras:Privacy: {warning}"])
        self.assertEqual(leakage.summary(), {"privacy_warnings": [warning]})

    def test_a_probe_rotates_the_labels_of_a_quarter_of_the_rows(self):
        guard = HijackGuard(probe_every=2, warmup=1, seed=4)
        y = tf.range(64, dtype=tf.int64)
        same, none = guard.labels(y, tf.constant(False))
        np.testing.assert_array_equal(same, y)
        self.assertFalse(none.numpy().any())
        sent, rows = guard.labels(y, tf.constant(True))
        sent, rows = sent.numpy(), rows.numpy()
        self.assertEqual(rows.sum(), 16)
        np.testing.assert_array_equal(sent != y.numpy(), rows)  # all moved
        np.testing.assert_array_equal(np.sort(sent[rows]), np.flatnonzero(rows))
        # Binary labels: a row next to one of its own class keeps its
        # label and is not counted.
        y = tf.constant([0, 1] * 8, tf.int64)
        sent, rows = guard.labels(y, tf.constant(True))
        np.testing.assert_array_equal(rows, sent.numpy() != y.numpy())
        same, rows = guard.labels(tf.zeros([16], tf.int64), tf.constant(True))
        self.assertFalse(rows.numpy().any())  # one class: nothing to probe
        # Too small a batch to compare two groups: not probed.
        _, rows = guard.labels(tf.range(2, dtype=tf.int64), tf.constant(True))
        self.assertFalse(rows.numpy().any())

    def test_bad_settings_are_refused(self):
        with self.assertRaisesRegex(ValueError, "probe_every must be >= 2, got 1"):
            HijackGuard(probe_every=1)
        with self.assertRaisesRegex(ValueError, "threshold must be > 0, got 0"):
            HijackGuard(threshold=0)
        with self.assertRaisesRegex(
            ValueError, "fraction must be in \\(0, 1\\), got 1"
        ):
            HijackGuard(fraction=1)


class GuardedClientTest(base.TestCase):
    def _client(self, guard_every=2):
        segments = _segments()
        privacy = ClientPrivacy(hijack_probe_every=guard_every, hijack_warmup=1)
        client = Client(segments.client, keras.optimizers.SGD(0.1), privacy=privacy)
        client.build_optimizer()
        return client, segments

    def test_a_probe_step_rotates_some_labels_and_leaves_the_client_as_it_was(self):
        client, segments = self._client()
        x, _ = _images(32, 0)
        y = np.arange(32, dtype="int64")  # distinct: every rotated label moves
        labels = tf.Variable(tf.zeros([32], tf.int64))

        class Recording:
            def handle(self, message):
                labels.assign(message.labels)
                grads = 1e-4 * tf.ones_like(message.tensors[0])
                return Message(Kind.GRADIENTS, 0, message.step, (grads,), loss=0.0)

        link = LocalTransport(Recording())
        step = tf.function(lambda x, y, s: client.train_step(link, s, x, y))
        weights, sent = [], []
        for s in range(3):  # regular, probe (step 1 = warmup), regular
            weights.append([v.numpy() for v in client.segment.weights])
            step(x, y, tf.constant(s, tf.int64))
            sent.append(labels.numpy())
        weights.append([v.numpy() for v in client.segment.weights])
        np.testing.assert_array_equal(sent[0], y)
        self.assertEqual(int(np.sum(sent[1] != y)), 8)  # a quarter of 32 rows
        np.testing.assert_array_equal(np.sort(sent[1]), np.sort(y))
        for before, after, moved in zip(weights, weights[1:], (True, False, True)):
            same = all(np.array_equal(b, a) for b, a in zip(before, after))
            self.assertEqual(same, not moved)

    def test_after_the_alarm_a_freezing_guard_applies_no_update(self):
        for freeze in (True, False):
            segments = _segments()
            privacy = ClientPrivacy(
                hijack_probe_every=2,
                hijack_warmup=1,
                hijack_probes=1,
                hijack_freeze=freeze,
            )
            client = Client(segments.client, keras.optimizers.SGD(0.1), privacy=privacy)
            client.build_optimizer()
            link = LocalTransport(_LabelBlind())
            x, _ = _images(32, 0)
            y = np.arange(32, dtype="int64")
            for s in range(2):  # regular, probe: the alarm goes off
                client.train_step(link, s, x, y)
            self.assertEqual(client.privacy.guard.alarm(), 2)
            before = [v.numpy() for v in client.segment.weights]
            client.train_step(link, 2, x, y)  # a regular step
            moved = any(
                not np.array_equal(b, v.numpy())
                for b, v in zip(before, client.segment.weights)
            )
            self.assertEqual(moved, not freeze)

    def test_a_resumed_client_keeps_its_guard_state_and_alarm(self):
        def guarded():
            segments = _segments()
            privacy = ClientPrivacy(
                hijack_probe_every=2, hijack_warmup=1, hijack_probes=1
            )
            client = Client(segments.client, keras.optimizers.SGD(0.1), privacy=privacy)
            client.build_optimizer()
            return client

        link = LocalTransport(_LabelBlind())
        x, _ = _images(32, 0)
        y = np.arange(32, dtype="int64")
        client = guarded()
        for s in range(2):  # regular, probe: the alarm goes off
            client.train_step(link, s, x, y)
        guard = client.privacy.guard
        self.assertEqual(guard.alarm(), 2)
        path = client.checkpoint().save(os.path.join(self.tempdir(), "ckpt"))
        resumed = guarded()
        self.assertIsNone(resumed.privacy.guard.alarm())
        resumed.checkpoint().restore(path).assert_consumed()
        again = resumed.privacy.guard
        self.assertEqual(again.alarm(), 2)
        self.assertEqual(again.score(), guard.score())
        self.assertEqual(again.lowest_score(), guard.lowest_score())
        self.assertEqual(int(again.steps), 2)
        # Still frozen: a regular step applies nothing.
        before = [v.numpy() for v in resumed.segment.weights]
        resumed.train_step(link, 2, x, y)
        self.assertWeightsClose([v.numpy() for v in resumed.segment.weights], before, 0)

    def test_the_guard_refuses_micro_batched_steps(self):
        client, _ = self._client()
        x, y = _images(8, 0)
        with self.assertRaisesRegex(
            ValueError,
            "the hijack guard \\(config.privacy.hijack_probe_every\\) probes "
            "steps that wait for their gradients, not micro-batched ones",
        ):
            client.train_step(None, 0, x, y, microbatches=2)


class GuardConfigTest(base.TestCase):
    def test_the_guard_is_refused_where_it_cannot_probe(self):
        c = fashion_mnist_lenet.get_config()
        c.privacy.hijack_probe_every = 10
        c.topology = "vertical"
        with self.assertRaisesRegex(
            ValueError,
            "config.privacy.hijack_probe_every=10 probes the steps of a client "
            "that holds the labels: use config.topology 'vanilla' or 'ushaped', "
            "not 'vertical'",
        ):
            from_config(c)
        c.topology = "ushaped"
        for field, value in (("label_epsilon", 2.0), ("marvell_strength", 0.25)):
            c.privacy[field] = value
            with self.assertRaisesRegex(
                ValueError,
                "beside config.privacy.label_epsilon or marvell_strength it raised "
                "false alarms on an honest server",
            ):
                from_config(c)
            c.privacy[field] = 0.0
        c.topology = "vanilla"
        c.train.microbatches = 4
        with self.assertRaisesRegex(
            ValueError,
            "hijack_probe_every=10 probes steps that wait for their gradients",
        ):
            from_config(c)


class HijackingTest(base.TestCase):
    """The guard against an honest server and against a hijacker."""

    def _train(self, hijacker: bool, steps=40):
        segments = _segments()
        privacy = ClientPrivacy(  # warns only: the client trains on
            hijack_probe_every=5, hijack_warmup=20, hijack_probes=3, hijack_freeze=False
        )
        client = Client(segments.client, keras.optimizers.Adam(0.01), privacy=privacy)
        client.build_optimizer()
        if hijacker:
            public, _ = _images(256, 1)
            server = FeatureSpaceHijacker(segments.client, public, batch_size=32)
        else:
            server = Server(segments.server, keras.optimizers.Adam(0.01), _loss())
            server.build_optimizer()
        link = LocalTransport(server)
        step = tf.function(lambda x, y, s: client.train_step(link, s, x, y))
        x, y = _images(32 * steps, 2)
        for s in range(steps):
            rows = slice(32 * s, 32 * s + 32)
            step(x[rows], y[rows], tf.constant(s, tf.int64))
        return client.privacy.guard, server, client

    def test_an_honest_server_raises_no_alarm(self):
        guard, _, _ = self._train(hijacker=False)
        self.assertIsNone(guard.alarm())
        self.assertGreater(guard.lowest_score(), 1.5)

    def test_a_hijacking_server_raises_the_alarm_after_the_first_probes(self):
        guard, _, _ = self._train(hijacker=True)
        # Probes at steps 20, 25, 30: the alarm is on after the third.
        self.assertEqual(guard.alarm(), 31)
        self.assertLess(guard.score(), 1.5)

    def test_the_critic_learns_apart_and_the_client_is_pushed_towards_the_pilot(self):
        segments = _segments()
        public, _ = _images(256, 1)
        hijacker = FeatureSpaceHijacker(segments.client, public, batch_size=64)
        x, _ = _images(64, 0)
        z = segments.client(x)
        pilot = hijacker.pilot(public[:64])

        def gap():  # the critic's score of the pilot's features over the client's
            critic = hijacker.critic
            return float(tf.reduce_mean(critic(pilot)) - tf.reduce_mean(critic(z)))

        before = gap()
        grads, _ = hijacker.step(z)
        self.assertGreater(gap(), before)  # the critic tells them apart better
        # A client step down the gradient it receives looks more like the pilot.
        score = float(tf.reduce_mean(hijacker.critic(z)))
        moved = float(tf.reduce_mean(hijacker.critic(z - 0.1 * grads / tf.norm(grads))))
        self.assertGreater(moved, score)

    def test_the_hijacker_answers_u_shaped_clients_with_outputs_then_gradients(self):
        segments = cut(_model(hidden=True), ("conv", "hidden"))
        public, _ = _images(64, 1)
        hijacker = FeatureSpaceHijacker(
            segments.client, public, server_segment=segments.server, batch_size=16
        )
        x, _ = _images(8, 0)
        z = segments.client(x)
        out = hijacker.handle(Message(Kind.TRAIN, 0, 0, (z,)))
        self.assertEqual(out.kind, Kind.SERVER_OUTPUT)
        self.assertEqual(out.tensors[0].shape, segments.server(z).shape)
        grads = hijacker.handle(
            Message(Kind.OUTPUT_GRADIENTS, 0, 0, (tf.ones_like(out.tensors[0]),))
        )
        self.assertEqual(grads.kind, Kind.GRADIENTS)
        self.assertEqual(grads.tensors[0].shape, z.shape)
        with self.assertRaisesRegex(ValueError, "OUTPUT_GRADIENTS before any TRAIN"):
            hijacker.handle(Message(Kind.OUTPUT_GRADIENTS, 0, 1, (out.tensors[0],)))


class AttackTableTest(base.TestCase):
    def test_a_row_the_topology_refuses_stops_the_table_before_any_run(self):
        c = fashion_mnist_lenet.get_config()  # vanilla: Marvell has no gradients
        workdir = os.path.join(self.tempdir(), "table")
        with self.assertRaisesRegex(ValueError, "marvell_strength=0.25 protects"):
            attack_table(c, workdir, rows=[0, 4])
        self.assertFalse(os.path.exists(workdir))

    def test_a_u_shaped_row_on_tiny_data_writes_every_column(self):
        root = self.tempdir()
        c = fashion_mnist_lenet.get_config()
        c.data.path = _write_npz(os.path.join(root, "tiny.npz"))
        c.topology, c.model.cut = "ushaped", "pool1,fc2"
        c.train.epochs, c.train.batch_size = 1, 32
        c.train.log_every_seconds = 0.0
        c.privacy.leakage_examples = 32
        c.privacy.hijack_warmup = 2
        workdir = os.path.join(root, "table")
        (row,) = attack_table(
            c,
            workdir,
            rows=[0],
            hijack_steps=12,
            hijack_probe_every=2,
            aux_examples=64,
            eval_examples=16,
            decoder_epochs=1,
            known_per_class=2,
        )
        self.assertEqual(row["defense"], ROWS[0][0])
        for key in ("reconstruction_ssim", "completion_accuracy", "hijack_ssim"):
            self.assertTrue(np.isfinite(row[key]), key)
        for key in ("norm_auc", "cosine_auc"):  # U-shaped: the server's view
            self.assertTrue(0.0 <= row[key] <= 1.0, key)
        # Warm-up 2, a probe every 2: the fifth probe is step 10.
        self.assertEqual(row["hijack_alarm_step"], 11)
        self.assertEqual([step for step, _ in row["hijack_curve"]], [12])
        with open(os.path.join(workdir, "attack_table.json")) as f:
            self.assertEqual(json.load(f)[0]["hijack_alarm_step"], 11)
        with open(os.path.join(workdir, "attack_table.md")) as f:
            text = f.read()
        self.assertIn("| hijacking SSIM, no detector | hijacking SSIM, detector", text)
        # U-shaped: model completion on the server's own bottom part too,
        # the client segment then the server's trained middle.
        run = os.path.join(workdir, "no_defense")
        sets = attack_sets(c, 64, 16, 2)
        client = restore_client_segment(c, run, sets.arrays)
        middle = restore_server_segment(c, run, sets.arrays)

        def bottom(x, training=False):
            return middle(client(x, training=training), training=training)

        expected = completion_accuracy(bottom, sets, c.seed)
        self.assertAlmostEqual(row["middle_completion_accuracy"], expected, places=6)
        self.assertIn(f"| {row['completion_accuracy']:.3f} / {expected:.3f} | ", text)
        self.assertIn("| no defense | ", text)


def _model(hidden=False):
    """conv -> pool -> (hidden ->) logits on 8x8 images, seeded."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(
        inputs
    )
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(h))
    if hidden:  # a U-shaped cut needs a middle
        h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    outputs = keras.layers.Dense(2, name="logits")(h)
    return keras.Model(inputs, outputs)


class HijackingHostRefusalTest(base.TestCase):
    def test_a_hijacking_host_stands_in_for_one_round_robin_server_only(self):
        public = np.zeros((1, 28, 28, 1))
        topology = (
            "a hijacking host stands in for round robin's server \\(method "
            "'split', vanilla or U-shaped\\), not topology '{}' with method '{}'"
        )
        cases = {
            "vertical": (
                {"topology": "vertical"},
                None,
                topology.format("vertical", "split"),
            ),
            "fedavg": (
                {"method": "fedavg"},
                None,
                topology.format("vanilla", "fedavg"),
            ),
            "micro-batches": (
                {"train.microbatches": 4},
                None,
                "a hijacking host takes whole batches: not with "
                "config.train.microbatches=4",
            ),
            "a strategy": (
                {},
                tf.distribute.OneDeviceStrategy("/cpu:0"),
                "a hijacking host runs in one process: not with a tf.distribute "
                "strategy \\(config.server.strategy\\)",
            ),
        }
        for name, (fields, strategy, message) in cases.items():
            with self.subTest(name):
                c = fashion_mnist_lenet.get_config()
                for key, value in fields.items():
                    section, _, leaf = key.rpartition(".")
                    (c[section] if section else c)[leaf] = value
                with self.assertRaisesRegex(ValueError, message):
                    deployment.hosted_parties(
                        c, "server", strategy=strategy, hijack_inputs=public
                    )

    def test_public_inputs_of_another_shape_are_refused(self):
        segments = _segments()
        with self.assertRaisesRegex(
            ValueError,
            "the hijacker's public inputs are \\(32, 32, 3\\) each; the client "
            "segment takes \\(8, 8, 1\\)",
        ):
            FeatureSpaceHijacker(segments.client, np.zeros((4, 32, 32, 3)))
