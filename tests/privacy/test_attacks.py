"""Privacy attacks: they succeed where leakage is total, fail where there is none."""

import os

import keras
import numpy as np
import tensorflow as tf

from splitkeras.privacy import attacks
from tests import base

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _smooth_images(n, seed, size=28):
    """Gaussian-smoothed noise in [0, 1]: texture everywhere, no flat regions,
    so a constant guess scores a low SSIM."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size, size, 1)).astype("float32")
    taps = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    x = tf.nn.conv2d(x, kernel[:, :, None, None].astype("float32"), 1, "SAME").numpy()
    low = x.min(axis=(1, 2, 3), keepdims=True)
    return (x - low) / np.ptp(x, axis=(1, 2, 3), keepdims=True)


class _Noise(keras.layers.Layer):
    """Outputs fresh Gaussian noise of a fixed shape, ignoring its input."""

    def __init__(self, shape, seed, **kwargs):
        super().__init__(**kwargs)
        self.noise_shape = tuple(shape)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x):
        batch = keras.ops.shape(x)[0]
        return keras.random.normal((batch, *self.noise_shape), seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.noise_shape)


def _segment(layer, input_shape=(28, 28, 1)):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs), name="client")


class ReconstructionTest(base.TestCase):
    TRAIN = {"epochs": 4, "batch_size": 32, "learning_rate": 3e-3, "width": 32}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        images = _smooth_images(640, seed=0)
        cls.x_aux, cls.x_eval = images[:512], images[512:]

    def test_identity_cut_is_reconstructed(self):
        result = attacks.reconstruction_attack(
            _segment(keras.layers.Identity()), self.x_aux, self.x_eval, **self.TRAIN
        )
        self.assertGreater(result["ssim"], 0.8)
        self.assertLess(result["mse"], 0.01)
        self.assertEqual(result["decoder"].output_shape, (None, 28, 28, 1))

    def test_noise_cut_is_not_reconstructed(self):
        # A 7x7 map also exercises the transposed-convolution path.
        result = attacks.reconstruction_attack(
            _segment(_Noise((7, 7, 8), seed=1)), self.x_aux, self.x_eval, **self.TRAIN
        )
        self.assertLess(result["ssim"], 0.3)
        # No better than predicting the mean image.
        mean_mse = np.mean((self.x_eval - self.x_aux.mean(axis=0)) ** 2)
        self.assertGreater(result["mse"], 0.9 * mean_mse)

    def test_flat_activations_decode_to_the_input_shape(self):
        activations = np.random.default_rng(2).standard_normal((64, 10))
        decoders = [
            attacks.train_decoder(activations, self.x_aux[:64], epochs=1, width=16)
            for _ in range(2)
        ]
        self.assertEqual(decoders[0].output_shape, (None, 28, 28, 1))
        out = decoders[0].predict(np.zeros((3, 10)), verbose=0)
        self.assertTrue(np.all((out >= 0) & (out <= 1)))  # sigmoid for [0, 1]
        # Seeded: the same pairs train the same decoder.
        self.assertWeightsClose(
            decoders[0].get_weights(), decoders[1].get_weights(), atol=1e-6
        )

    def test_evaluate_scores_a_perfect_decoder(self):
        decoder = _segment(keras.layers.Identity())
        scores = attacks.evaluate_reconstruction(decoder, self.x_eval, self.x_eval)
        self.assertEqual(scores["mse"], 0.0)
        self.assertAlmostEqual(scores["ssim"], 1.0, places=5)

    def test_save_grid_writes_a_png(self):
        path = os.path.join(self.tempdir(), "grids", "recon.png")
        noisy = np.clip(self.x_eval + 0.1, 0.0, 1.0)
        self.assertEqual(attacks.save_grid(self.x_eval, noisy, path, n=5), path)
        with open(path, "rb") as f:
            data = f.read()
        self.assertGreater(len(data), 0)
        self.assertEqual(data[:8], PNG_SIGNATURE)
        image = tf.io.decode_png(data)
        self.assertEqual(image.shape, (2 * 28 + 2, 5 * 28 + 4 * 2, 1))

    def test_save_grid_rejects_mismatched_batches(self):
        with self.assertRaisesRegex(ValueError, "one shape"):
            attacks.save_grid(self.x_eval[:4], self.x_eval[:3], "unused.png")


def _brute_force_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg).sum()
    return wins / (len(pos) * len(neg))


class LabelLeakageTest(base.TestCase):
    def _cut_gradients(self, n=400, positive_rate=0.1, steps=10, seed=0):
        """Per-example d(loss)/d(cut) of a tiny two-party binary classifier.

        The features carry little signal, so after a few steps the server's
        bias has learnt the class prior and every prediction p is near 0.1.
        The gradient at the cut is (p - y) * w: |p - y| is about 0.9 for the
        minority positives and 0.1 for the negatives.
        """
        rng = np.random.default_rng(seed)
        labels = (rng.random(n) < positive_rate).astype("float32")
        x = rng.standard_normal((n, 6)).astype("float32")
        x[:, 0] += 0.3 * labels  # a weak signal
        keras.utils.set_random_seed(seed)
        client = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, "relu")])
        server = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        loss_fn = keras.losses.BinaryCrossentropy(
            from_logits=True, reduction="sum"
        )  # a sum: each example's gradient is its own loss's gradient
        optimizer = keras.optimizers.Adam(0.05)
        variables = client.trainable_variables + server.trainable_variables
        for _ in range(steps):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels[:, None], server(client(x))) / n
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        cut = client(x)
        with tf.GradientTape() as tape:
            tape.watch(cut)
            logits = server(cut)
            loss = loss_fn(labels[:, None], logits)
        probabilities = tf.sigmoid(logits).numpy()
        return tape.gradient(loss, cut).numpy(), labels, probabilities

    def test_gradients_leak_imbalanced_labels(self):
        gradients, labels, probabilities = self._cut_gradients()
        self.assertLess(probabilities.max(), 0.5)  # the premise of the attack
        leakage = attacks.label_leakage(gradients, labels)
        self.assertGreater(leakage["norm_auc"], 0.9)
        self.assertGreater(leakage["cosine_auc"], 0.9)

    def test_random_gradients_leak_nothing(self):
        rng = np.random.default_rng(3)
        gradients = rng.standard_normal((2000, 4, 4))
        labels = (rng.random(2000) < 0.1).astype(int)
        leakage = attacks.label_leakage(gradients, labels)
        self.assertAlmostEqual(leakage["norm_auc"], 0.5, delta=0.1)
        self.assertAlmostEqual(leakage["cosine_auc"], 0.5, delta=0.1)

    def test_leak_auc_equals_brute_force_with_ties(self):
        rng = np.random.default_rng(4)
        for trial in range(50):
            n = int(rng.integers(2, 60))
            labels = rng.integers(0, 2, n)
            labels[:2] = [0, 1]
            # Few distinct values on odd trials: many ties.
            scores = rng.integers(0, 4, n) * 0.1 if trial % 2 else rng.random(n)
            self.assertEqual(
                attacks.leak_auc(scores, labels), _brute_force_auc(scores, labels)
            )

    def test_leak_auc_is_not_folded(self):
        labels = np.array([0, 0, 1, 1])
        self.assertEqual(attacks.leak_auc([4.0, 3.0, 2.0, 1.0], labels), 0.0)
        self.assertEqual(attacks.leak_auc([1.0, 2.0, 3.0, 4.0], labels), 1.0)
        self.assertEqual(attacks.leak_auc([1.0, 1.0, 1.0, 1.0], labels), 0.5)

    def test_leak_auc_needs_both_classes(self):
        with self.assertRaisesRegex(ValueError, "both classes"):
            attacks.leak_auc([0.1, 0.2], [1, 1])
        with self.assertRaisesRegex(ValueError, "0/1"):
            attacks.leak_auc([0.1, 0.2], [0, 2])

    def test_scores(self):
        gradients = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
        np.testing.assert_allclose(attacks.norm_scores(gradients), [5, 0, 1, 2])
        np.testing.assert_allclose(
            attacks.cosine_scores(gradients), [1.0, 0.0, -0.6, 0.8]
        )
        np.testing.assert_allclose(
            attacks.cosine_scores(gradients, reference=[1.0, 0.0]),
            [0.6, 0.0, -1.0, 0.0],
        )
