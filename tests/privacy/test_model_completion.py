"""Model completion: a part that keeps the labels' signal gives them away."""

import keras
import numpy as np

from splitkeras.privacy.attacks import known_examples, model_completion_attack
from tests import base


def _blobs(n, seed):
    """Four well separated classes in 8 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centres = np.eye(4, 8) * 6.0
    return (centres[y] + rng.normal(size=(n, 8))).astype(np.float32), y


class ModelCompletionTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = _blobs(400, 0)
        self.x_test, self.y_test = _blobs(400, 1)
        self.known = known_examples(self.y, 5, seed=0)

    def _attack(self, part):
        return model_completion_attack(
            part,
            self.x[self.known],
            self.y[self.known],
            self.x_test,
            self.y_test,
            num_classes=4,
        )

    def test_known_examples_take_per_class_rows(self):
        self.assertEqual(len(self.known), 20)
        np.testing.assert_array_equal(np.bincount(self.y[self.known]), [5, 5, 5, 5])
        np.testing.assert_array_equal(self.known, np.sort(self.known))

    def test_a_part_that_keeps_the_input_gives_the_labels_away(self):
        part = keras.Sequential([keras.Input((8,)), keras.layers.Identity()])
        self.assertGreater(self._attack(part), 0.95)

    def test_a_constant_part_gives_chance_and_is_not_changed(self):
        part = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(3, kernel_initializer="zeros")]
        )
        before = [w.copy() for w in part.get_weights()]
        accuracy = self._attack(part)
        # One class for every input: that class's share of the test set.
        self.assertLessEqual(accuracy, max(np.bincount(self.y_test)) / 400)
        self.assertWeightsClose(part.get_weights(), before, atol=0.0)
