"""Label DP by randomized response: the keep rate, the draw, and a run."""

import math
import os

import numpy as np
from absl.testing import parameterized

from splitkeras import client_data, experiment
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.data.sites import Site
from splitkeras.privacy import label_dp
from splitkeras.privacy.label_dp import keep_probability, randomized_response
from splitkeras.privacy.leakage import Leakage
from tests import base
from tests.test_experiment import _write_npz


class RandomizedResponseTest(base.TestCase, parameterized.TestCase):
    @parameterized.parameters((1.0, 10), (2.0, 10), (4.0, 2), (0.5, 100))
    def test_keep_rate_and_uniform_others(self, epsilon, k):
        expected = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
        self.assertAlmostEqual(keep_probability(epsilon, k), expected, places=12)
        labels = np.zeros(200_000, np.int64)
        noisy = randomized_response(labels, epsilon, k, seed=0)
        kept = float(np.mean(noisy == 0))
        # 200,000 draws: 5 standard errors.
        self.assertAlmostEqual(kept, expected, delta=5 * math.sqrt(expected / 2e5))
        others = np.bincount(noisy[noisy != 0], minlength=k)[1:]
        self.assertLess(np.ptp(others) / others.mean(), 0.2 if k <= 10 else 0.6)

    def test_same_seed_same_labels_and_dtype_kept(self):
        labels = np.arange(1000, dtype=np.int32) % 10
        a = randomized_response(labels, 1.0, 10, seed=(0, 1))
        np.testing.assert_array_equal(a, randomized_response(labels, 1.0, 10, (0, 1)))
        self.assertFalse(
            np.array_equal(a, randomized_response(labels, 1.0, 10, (0, 2)))
        )
        self.assertEqual(a.dtype, np.int32)
        self.assertTrue(((a >= 0) & (a < 10)).all())

    def test_bad_settings_are_refused(self):
        with self.assertRaisesRegex(ValueError, r"^label DP needs epsilon > 0, got 0$"):
            keep_probability(0, 10)
        with self.assertRaisesRegex(
            ValueError, r"^label DP needs at least 2 classes, got 1$"
        ):
            keep_probability(1.0, 1)


class LabelDPInTrainingTest(base.TestCase):
    def _config(self, npz, epsilon):
        c = fashion_mnist_lenet.get_config()
        c.data.path = npz
        c.train.epochs = 1
        c.train.batch_size = 64
        c.privacy.label_epsilon = epsilon
        return c

    def test_every_epoch_trains_on_the_same_randomized_labels(self):
        y = np.random.default_rng(0).integers(0, 10, 640)
        # Each example's pixel is its row number: batches map back to rows.
        x = np.arange(640, dtype=np.float32).reshape(640, 1, 1, 1)
        site = Site("client_0", x, y, x[:1], y[:1], num_classes=10)
        c = self._config("", 1.0)
        c.train.batch_size = 640

        def labels_by_row(epoch, k=0):
            ((batch_x, batch_y),) = list(client_data.train_batches(c, site, k, epoch))
            rows = batch_x.numpy().reshape(-1).astype(int)
            self.assertFalse(np.array_equal(rows, np.arange(640)))  # shuffled
            out = np.empty(640, np.int64)
            out[rows] = batch_y.numpy()
            return out

        first = labels_by_row(0)
        np.testing.assert_array_equal(first, labels_by_row(1))
        np.testing.assert_array_equal(
            first, randomized_response(y, 1.0, 10, seed=label_dp.secret_seed(0))
        )
        self.assertFalse(np.array_equal(first, labels_by_row(0, k=1)))
        # The config's seed does not give the draw away: the secret is not
        # derived from it.
        for guess in ((0, 0x1ABE1, 0), 0, (0, 0)):
            self.assertFalse(
                np.array_equal(first, randomized_response(y, 1.0, 10, seed=guess))
            )
        changed = float(np.mean(first != y))
        # 1 - e / (e + 9) = 0.768 of the labels change at epsilon 1.
        self.assertAlmostEqual(changed, 1 - math.e / (math.e + 9), delta=0.07)

    def test_secret_seeds_differ_per_party_and_process(self):
        self.assertEqual(label_dp.secret_seed(7), label_dp.secret_seed(7))
        self.assertNotEqual(label_dp.secret_seed(7), label_dp.secret_seed(8))
        saved = dict(label_dp._SECRETS)
        label_dp._SECRETS.clear()  # as in a new process
        try:
            self.assertNotEqual(label_dp.secret_seed(7), saved[7])
        finally:
            label_dp._SECRETS.clear()
            label_dp._SECRETS.update(saved)

    def test_leakage_scores_gradients_of_randomized_labels(self):
        root = self.tempdir()
        arrays = np.load(_write_npz(os.path.join(root, "tiny.npz")))
        data = Site(
            "d",
            arrays["x_train"],
            arrays["y_train"],
            arrays["x_test"],
            arrays["y_test"],
            num_classes=10,
        )
        plain = Leakage(self._config("", 0.0), data)
        np.testing.assert_array_equal(plain.y_trained, plain.y.numpy())
        private = Leakage(self._config("", 1.0), data)
        changed = float(np.mean(private.y_trained != private.y.numpy()))
        # 64 leakage examples; 77% change at epsilon 1 with 10 classes.
        self.assertGreater(changed, 0.5)

    def test_ushaped_run_with_label_dp_reports_its_epsilon(self):
        root = self.tempdir()
        npz = _write_npz(os.path.join(root, "tiny.npz"))
        c = self._config(npz, 0.5)
        c.topology = "ushaped"
        c.model.cut = "pool1,fc2"
        summary = experiment.train_and_evaluate(c, os.path.join(root, "run"))
        self.assertEqual(summary["privacy"]["label_epsilon"], 0.5)
        self.assertIn("label_leak_norm_auc", summary)
