"""Marvell-style label protection: the noise, its budget, where it acts."""

import types

import keras
import numpy as np
import tensorflow as tf

from splitkeras import builders, deployment
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.data.sites import Site
from splitkeras.objective import Objective
from splitkeras.parties import Client
from splitkeras.parties.vertical_server import VerticalServer, label_protection
from splitkeras.privacy import marvell
from splitkeras.privacy.defenses import ClientPrivacy, from_config
from splitkeras.privacy.leakage import Leakage
from splitkeras.protocol import Kind, Message
from tests import base
from tests.schedules import test_vertical


def _gradients(n=40, d=6, classes=3, seed=0):
    """Per-example gradients whose class means differ, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = rng.normal(size=(classes, d))
    g = centers[y] + 0.3 * rng.normal(size=(n, d))
    return g, y


def _reference(g, y, k):
    """Delta, p, u, v of class k against the rest, in numpy."""
    inside, outside = g[y == k], g[y != k]
    delta = inside.mean(0) - outside.mean(0)
    d = g.shape[1]
    u = ((inside - inside.mean(0)) ** 2).sum(1).mean() / d
    v = ((outside - outside.mean(0)) ** 2).sum(1).mean() / d
    return delta, len(inside) / len(g), u, v


class MarvellTest(base.TestCase):
    def test_strength_zero_is_the_identity(self):
        g, y = _gradients()
        g = tf.constant(g, tf.float32)
        self.assertIs(marvell.marvell_noise(g, y, 0.0, 1), g)
        privacy = ClientPrivacy(gradient_max_norm=100.0)
        (sent,) = privacy.protect_gradients([g], y)
        np.testing.assert_array_equal(sent.numpy(), g.numpy())

    def test_binary_noise_lies_along_delta(self):
        g, y = _gradients(classes=2)
        out = marvell.marvell_noise(g, y, 1.0, keras.random.SeedGenerator(3))
        noise = out.numpy() - g
        delta, _, _, _ = _reference(g, y, 1)
        e = delta / np.linalg.norm(delta)
        orthogonal = noise - np.outer(noise @ e, e)
        self.assertGreater(np.abs(noise @ e).min(), 0.0)
        # float64 throughout: only rounding is left of the orthogonal part.
        self.assertLess(np.abs(orthogonal).max(), 1e-12 * np.abs(noise).max())
        # Both one-vs-rest problems are one line: mirrored variances, so
        # class 1's examples get a1_1 + a0_0 = 2 a1_1 along Delta.
        _, a1, a0, directions = marvell.marvell_variances(g, y, 1.0)
        np.testing.assert_allclose(a1.numpy(), a0.numpy()[::-1], rtol=1e-12)
        np.testing.assert_allclose(directions[0], -directions[1], rtol=1e-12)

    def test_chosen_variances_meet_the_budget_and_minimize_symmetric_kl(self):
        g, y = _gradients(n=50, classes=3)
        strength = 0.7
        classes, a1, a0, directions = (
            t.numpy() for t in marvell.marvell_variances(g, y, strength)
        )
        np.testing.assert_array_equal(classes, [0, 1, 2])
        # A finer grid than GRID's 101 splits: ours is within 0.5% of its best.
        share = np.linspace(0.0, 1.0, 100001)
        for k in classes:
            delta, p, u, v = _reference(g, y, k)
            power = strength * delta @ delta
            np.testing.assert_allclose(p * a1[k] + (1 - p) * a0[k], power, rtol=1e-12)
            np.testing.assert_allclose(
                directions[k], delta / np.linalg.norm(delta), atol=1e-12
            )
            ours = marvell.symmetric_kl(delta @ delta, u + a1[k], v + a0[k])
            fine = marvell.symmetric_kl(
                delta @ delta,
                u + share * power / p,
                v + (1 - share) * power / (1 - p),
            )
            self.assertGreaterEqual(ours, fine.min() - 1e-12)
            self.assertLessEqual(ours, fine.min() * 1.005)
            # The budget is split, not all given to one side.
            self.assertGreater(a1[k] * a0[k], 0.0)

    def test_known_number_of_classes_gives_the_same_variances(self):
        g, y = _gradients(classes=3)
        _, a1, a0, e = marvell.marvell_variances(g, y, 1.0)
        # Classes 0..4: 3 and 4 are absent and get no noise.
        _, b1, b0, f = marvell.marvell_variances(g, y, 1.0, num_classes=5)
        np.testing.assert_allclose(b1.numpy(), np.r_[a1.numpy(), 0, 0], rtol=1e-12)
        np.testing.assert_allclose(b0.numpy(), np.r_[a0.numpy(), 0, 0], rtol=1e-12)
        np.testing.assert_array_equal(f.numpy()[3:], 0.0)
        np.testing.assert_allclose(f.numpy()[:3], e.numpy(), atol=1e-15)
        # One-hot labels name the same classes.
        _, c1, c0, _ = marvell.marvell_variances(g, np.eye(3)[y], 1.0)
        np.testing.assert_array_equal(c1.numpy(), a1.numpy())
        np.testing.assert_array_equal(c0.numpy(), a0.numpy())

    def test_a_class_holding_every_example_gets_no_noise(self):
        g, _ = _gradients()
        y = np.zeros(len(g), np.int64)
        _, a1, a0, _ = marvell.marvell_variances(g, y, 1.0)
        self.assertEqual((a1.numpy().tolist(), a0.numpy().tolist()), ([0.0], [0.0]))
        out = marvell.marvell_noise(g, y, 1.0, 0)
        np.testing.assert_array_equal(out.numpy(), g)

    def test_mean_power_matches_the_budget(self):
        g, y = _gradients(n=30, classes=3)
        strength = 2.0
        copies = 400  # the batch repeated: the same statistics, more draws
        g_many, y_many = np.tile(g, (copies, 1)), np.tile(y, copies)
        out = marvell.marvell_noise(
            tf.constant(g_many), y_many, strength, keras.random.SeedGenerator(0)
        )
        power = ((out.numpy() - g_many) ** 2).sum(1)
        _, a1, a0, e = (t.numpy() for t in marvell.marvell_variances(g, y, strength))
        # Independent zero-mean draws per class: E|sum_k z_k e_k|^2 =
        # sum_k E z_k^2 = sum_k (p_k a1_k + (1 - p_k) a0_k) = s sum_k |Delta_k|^2.
        expected = strength * sum(
            _reference(g, y, k)[0] @ _reference(g, y, k)[0] for k in range(3)
        )
        # Var(z' G z) = 2 tr(G D G D) for z ~ N(0, D), G the directions' Gram
        # matrix: the mean of copies * n such terms is within 4 standard
        # deviations of its expectation but for a chance below 1e-4.
        gram = e @ e.T
        variances = [
            2 * np.trace(gram @ np.diag(d) @ gram @ np.diag(d))
            for d in np.where(np.eye(3)[y] > 0, a1, a0)
        ]
        sd = np.sqrt(np.sum(variances) * copies) / len(power)
        self.assertLess(abs(power.mean() - expected), 4 * sd)
        self.assertLess(4 * sd, 0.05 * expected)  # the check is tight

    def test_traced_with_any_batch_size(self):
        g, y = _gradients(classes=2)
        seeds = keras.random.SeedGenerator(0)
        noised = tf.function(
            lambda g, y: marvell.marvell_noise(g, y, 1.0, seeds, num_classes=2),
            input_signature=[
                tf.TensorSpec([None, 6], tf.float32),
                tf.TensorSpec([None], tf.int64),
            ],
        )
        for n in (40, 7):
            out = noised(tf.constant(g[:n], tf.float32), y[:n])
            self.assertEqual(out.shape, (n, 6))
            self.assertGreater(np.abs(out.numpy() - g[:n]).max(), 0.0)


class MarvellInPartiesTest(base.TestCase):
    def test_config_threads_strength_and_refuses_negative(self):
        c = fashion_mnist_lenet.get_config()
        self.assertIsNone(from_config(c))
        c.privacy.marvell_strength = 0.5
        with self.assertRaisesRegex(
            ValueError,
            r"^config.privacy.marvell_strength=0.5 protects the gradients a "
            r"label holder sends: use config.topology 'ushaped' or 'vertical', "
            r"not 'vanilla' \(there the server receives the labels\)$",
        ):
            from_config(c)
        c.topology = "ushaped"
        self.assertEqual(from_config(c).marvell_strength, 0.5)
        self.assertEqual(label_protection(c)["marvell_strength"], 0.5)
        with self.assertRaisesRegex(
            ValueError, r"^marvell_strength must be >= 0, got -1.0$"
        ):
            ClientPrivacy(marvell_strength=-1.0)

    def test_protect_gradients_needs_the_labels(self):
        with self.assertRaisesRegex(
            ValueError,
            r"^marvell_strength=0.5 needs the labels the gradients come from: "
            r"protect_gradients\(gradients, labels\)$",
        ):
            ClientPrivacy(marvell_strength=0.5).protect_gradients([tf.zeros((2, 3))])

    def test_noise_comes_before_clipping(self):
        g, y = _gradients(classes=2)
        privacy = ClientPrivacy(marvell_strength=4.0, gradient_max_norm=0.5)
        (sent,) = privacy.protect_gradients([tf.constant(g, tf.float32)], y)
        norms = np.linalg.norm(sent.numpy(), axis=1)
        self.assertLessEqual(norms.max(), 0.5 * (1 + 1e-6))

    def test_vertical_server_noises_only_the_other_clients_gradients(self):
        keras.utils.set_random_seed(0)
        width, n = 6, 32
        inputs = keras.Input((2 * width,))
        server = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        rng = np.random.default_rng(1)
        cuts = [tf.constant(rng.normal(size=(n, width)), tf.float32) for _ in range(2)]
        y = tf.constant(np.arange(n) % 2)
        ids = tf.range(n, dtype=tf.int64)

        def replies(strength):
            party = VerticalServer(
                keras.models.clone_model(server),
                keras.optimizers.SGD(0.0),
                Objective(keras.losses.SparseCategoricalCrossentropy(True), ()),
                2,
                marvell_strength=strength,
                seed=5,
            )
            party.segment.set_weights(server.get_weights())
            messages = [
                Message(Kind.TRAIN, 0, 1, (cuts[0],), labels=y, ids=ids),
                Message(Kind.TRAIN, 1, 1, (cuts[1],), ids=ids),
            ]
            return [r.tensors[0].numpy() for r in party.handle_batch(messages)]

        plain, noised = replies(0.0), replies(1.0)
        np.testing.assert_array_equal(noised[0], plain[0])  # the label owner's
        noise = noised[1] - plain[1]
        delta, _, _, _ = _reference(plain[1].astype(np.float64), y.numpy(), 1)
        e = delta / np.linalg.norm(delta)
        self.assertGreater(np.abs(noise @ e).min(), 0.0)
        orthogonal = noise - np.outer(noise @ e, e)
        # float32 gradients: the noise is added in float32.
        self.assertLess(np.abs(orthogonal).max(), 1e-5 * np.abs(noise).max())

    def test_a_resumed_vertical_server_draws_the_same_noise(self):
        images, ids, y = test_vertical._data(3 * test_vertical.BATCH)
        ds = test_vertical._vertical_dataset(images, ids, y)
        split = test_vertical._split(marvell_strength=1.0, run_eagerly=True)
        split.train_epoch(ds.take(1))
        checkpoints = split.checkpoints()
        self.assertIn("marvell_seeds", checkpoints["server"]._trackable_children())
        root = self.tempdir()
        paths = {name: c.write(f"{root}/{name}") for name, c in checkpoints.items()}
        split.train_epoch(ds.skip(1))
        uninterrupted = test_vertical._split_weights(split)
        for name, checkpoint in checkpoints.items():
            checkpoint.read(paths[name]).assert_consumed()
        split.train_epoch(ds.skip(1))
        self.assertWeightsClose(
            sum(test_vertical._split_weights(split), []), sum(uninterrupted, []), 0
        )

    def test_ushaped_leakage_measures_marvell(self):
        rng = np.random.default_rng(0)
        y = np.arange(96) % 3
        x = (rng.normal(size=(96, 4)) + 2.0 * np.eye(4)[y]).astype(np.float32)
        site = Site("d", x, y, x, y, num_classes=3)
        c = fashion_mnist_lenet.get_config()
        c.topology = "ushaped"
        c.train.batch_size = 32
        c.privacy.leakage_examples = 96
        keras.utils.set_random_seed(2)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, activation="relu", name="a")(inputs)
        h = keras.layers.Dense(8, activation="relu", name="b")(h)
        model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))
        segments = cut(model, ["a", "b"])
        client = Client(
            segments.client,
            keras.optimizers.SGD(0.1),
            tail=segments.tail,
            objective=Objective(keras.losses.SparseCategoricalCrossentropy(True), ()),
        )
        trainer = types.SimpleNamespace(
            client=client, server=types.SimpleNamespace(segment=segments.server)
        )
        plain = Leakage(c, site)(trainer)["label_leak_cosine_auc"]
        client.privacy = ClientPrivacy(marvell_strength=1.0, seed=0)
        noised = Leakage(c, site)(trainer)["label_leak_cosine_auc"]
        # Over 4 data/model seeds x 3 noise seeds: |plain - 0.5| >= 0.40,
        # |noised - 0.5| <= 0.21 (this seed: 1.000 -> 0.357).
        self.assertGreater(abs(plain - 0.5), 0.4)
        self.assertLess(abs(noised - 0.5), 0.25)
        self.record(f"marvell cosine AUC {plain:.3f} -> {noised:.3f}")

    def test_vertical_servers_from_a_config_take_the_strength(self):
        c = fashion_mnist_lenet.get_config()
        c.topology = "vertical"
        c.num_clients = 2
        c.privacy.marvell_strength = 0.5
        _, coordinator, _ = deployment.hosted_parties(c, "server")
        self.assertEqual(coordinator.server.marvell_strength, 0.5)
        schedule = builders.build_schedule(c)
        self.assertEqual(schedule.server.marvell_strength, 0.5)
        # One seed in process and on a host: the same noise either way.
        np.testing.assert_array_equal(
            schedule.server._seeds.state.numpy(),
            coordinator.server._seeds.state.numpy(),
        )
