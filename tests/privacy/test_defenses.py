"""NoPeek, activation noise and label protection inside the client's step."""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from splitkeras import experiment
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.parties import Client
from splitkeras.privacy.defenses import ClientPrivacy, flat_batch
from splitkeras.privacy.distance_correlation import distance_correlation
from tests import base
from tests.test_experiment import _write_npz


def _segments():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(4, name="logits")(h)
    return cut(keras.Model(inputs, outputs), "conv")


def _client(privacy):
    segments = _segments()
    client = Client(segments.client, keras.optimizers.SGD(1.0), privacy=privacy)
    client.build_optimizer()
    return client


class DefensesTest(base.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = tf.constant(rng.random((16, 6, 6, 1)), tf.float32)
        self.g = tf.constant(rng.normal(size=(16, 4, 4, 3)) * 0.1, tf.float32)

    def _update(self, privacy):
        """Weights before, after one backward with server gradients self.g."""
        client = _client(privacy)
        before = [v.numpy() for v in client.segment.trainable_variables]
        client.backward(client.forward(self.x), [self.g])
        after = [v.numpy() for v in client.segment.trainable_variables]
        return client, before, after

    def test_nopeek_gradient_is_task_plus_alpha_dcor_gradient(self):
        alpha = 0.7
        client, before, after = self._update(ClientPrivacy(nopeek_alpha=alpha))
        # The expected gradient, computed apart on a fresh copy (same seed).
        fresh = _client(None)
        variables = fresh.segment.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            a = fresh.segment(self.x, training=True)
            dcor = distance_correlation(flat_batch(self.x), flat_batch(a))
        task = tape.gradient(a, variables, output_gradients=self.g)
        leak = tape.gradient(dcor, variables)
        self.assertGreater(float(dcor), 0.1)
        for w0, w1, gt, gl in zip(before, after, task, leak):
            # SGD(1.0): the update is minus the gradient.
            np.testing.assert_allclose(w0 - w1, gt + alpha * gl, atol=1e-5)
            self.assertGreater(float(tf.reduce_max(tf.abs(gl))), 0.0)

    def test_activation_noise_is_sent_but_does_not_change_the_gradient(self):
        sigma = 0.5
        noisy = _client(ClientPrivacy(activation_noise=sigma, seed=1))
        clean = _client(None)
        sent = noisy.forward(self.x).cut[0]
        true = clean.segment(self.x, training=True)
        noise = (sent - true).numpy()
        self.assertAlmostEqual(float(noise.std()), sigma, delta=0.05)
        self.assertAlmostEqual(float(noise.mean()), 0.0, delta=0.05)
        # The noise is a constant for the gradient: same update as clean.
        _, _, after_noisy = self._update(ClientPrivacy(activation_noise=sigma))
        _, _, after_clean = self._update(None)
        self.assertWeightsClose(after_noisy, after_clean, atol=1e-6)
        # Inference (what the server sees at evaluation) is noised too.
        self.assertGreater(
            float(
                tf.reduce_max(tf.abs(noisy.infer(self.x)[0] - clean.infer(self.x)[0]))
            ),
            0.1,
        )

    def test_gradient_protection_clips_and_noises_per_example(self):
        g = tf.constant(np.random.default_rng(1).normal(size=(32, 10)), tf.float32)
        clipped = ClientPrivacy(gradient_max_norm=0.5).protect_gradients([g])[0]
        norms = tf.norm(clipped, axis=1).numpy()
        self.assertLessEqual(norms.max(), 0.5 + 1e-5)
        # Clipping keeps directions.
        cosine = tf.reduce_sum(
            tf.math.l2_normalize(g, 1) * tf.math.l2_normalize(clipped, 1), 1
        )
        np.testing.assert_allclose(cosine.numpy(), 1.0, atol=1e-5)
        small = g * 1e-3  # under the bound: unchanged
        np.testing.assert_allclose(
            ClientPrivacy(gradient_max_norm=0.5).protect_gradients([small])[0], small
        )
        noised = ClientPrivacy(gradient_noise=0.2).protect_gradients([g * 0.0])[0]
        self.assertAlmostEqual(float(tf.math.reduce_std(noised)), 0.2, delta=0.03)

    def test_negative_settings_are_refused(self):
        with self.assertRaisesRegex(ValueError, "nopeek_alpha must be >= 0, got -1"):
            ClientPrivacy(nopeek_alpha=-1)


class LeakageInExperimentTest(base.TestCase):
    def test_summary_has_leakage_and_noise_lowers_it(self):
        root = self.tempdir()
        npz = _write_npz(os.path.join(root, "tiny.npz"))
        results = {}
        for name, noise in (("plain", 0.0), ("noised", 2.0)):
            c = fashion_mnist_lenet.get_config()
            c.data.path = npz
            c.train.epochs = 1
            c.train.batch_size = 64
            c.privacy.activation_noise = noise
            c.privacy.nopeek_alpha = 0.1
            workdir = os.path.join(root, name)
            results[name] = experiment.train_and_evaluate(c, workdir)
            with open(os.path.join(workdir, "summary.json")) as f:
                self.assertEqual(json.load(f)["privacy"]["activation_noise"], noise)
        plain, noised = (
            results["plain"]["leakage_dcor"],
            results["noised"]["leakage_dcor"],
        )
        self.assertGreater(plain, 0.5)
        self.assertLess(noised, plain - 0.2)


class ColorectalConfigTest(base.TestCase):
    def test_config_cuts_its_model_and_turns_nopeek_on(self):
        from splitkeras import models
        from splitkeras.configs import colorectal_nopeek

        c = colorectal_nopeek.get_config()
        self.assertEqual(c.data.name, "colorectal_histology")
        self.assertGreater(c.privacy.nopeek_alpha, 0)
        model = models.build_model(
            c.model.name, input_shape=(32, 32, 3), num_classes=8, width=0.25
        )
        segments = cut(model, c.model.cut)
        self.assertEqual(len(segments.client.outputs), 1)


class LabelLeakageInExperimentTest(base.TestCase):
    def test_ushaped_runs_report_label_leakage_and_noise_blunts_it(self):
        root = self.tempdir()
        npz = _write_npz(os.path.join(root, "tiny.npz"))
        results = {}
        for name, noise in (("plain", 0.0), ("protected", 1.0)):
            c = fashion_mnist_lenet.get_config()
            c.data.path = npz
            c.train.epochs = 1
            c.train.batch_size = 64
            c.topology = "ushaped"
            c.model.cut = "pool1,fc2"
            c.privacy.gradient_noise = noise
            results[name] = experiment.train_and_evaluate(c, os.path.join(root, name))
        with open(os.path.join(root, "plain", "summary.json")) as f:
            summary = json.load(f)
        for key in ("label_leak_norm_auc", "label_leak_cosine_auc"):
            self.assertIn(key, summary)
        # Two bright/dark classes: the server's gradients separate them.
        plain = results["plain"]["label_leak_cosine_auc"]
        self.assertGreater(abs(plain - 0.5), 0.3)
        # Noise far above the gradients' scale leaves about chance.
        self.assertLess(abs(results["protected"]["label_leak_cosine_auc"] - 0.5), 0.2)
