"""Objective: the label holder's loss and running metrics."""

import keras
import numpy as np

from splitkeras.objective import Objective
from tests import base


class ObjectiveTest(base.TestCase):
    def test_training_and_evaluation_metrics_are_separate(self):
        metric = keras.metrics.MeanSquaredError(name="m2")
        objective = Objective("mse", ["mae", metric])
        y, y_pred = np.array([[1.0], [2.0]]), np.array([[1.5], [2.0]])
        loss = objective(y, y_pred, training=True)
        self.assertAlmostEqual(float(loss), 0.125)
        self.assertEqual(
            objective.result(training=True),
            {"loss": 0.125, "mean_absolute_error": 0.25, "m2": 0.125},
        )
        self.assertEqual(objective.result(training=False)["m2"], 0.0)
        objective(y, y, training=False)
        self.assertEqual(objective.result(training=True)["m2"], 0.125)
        objective.reset(training=True)
        self.assertEqual(objective.result(training=True)["loss"], 0.0)

    def test_loss_matches_keras_with_sample_weights(self):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        objective = Objective(loss)
        y = np.array([0, 2, 1])
        logits = np.random.default_rng(0).normal(size=(3, 3)).astype("float32")
        weights = np.array([1.0, 0.5, 0.0], "float32")
        self.assertAlmostEqual(
            float(objective(y, logits, weights)),
            float(loss(y, logits, sample_weight=weights)),
            places=6,
        )
        mse = Objective("mse", [])
        self.assertAlmostEqual(
            float(mse(np.ones((2, 1)), np.zeros((2, 1)), np.array([1.0, 0.0]))), 0.5
        )

    def test_per_example_loss_scores_16_bit_outputs_in_float32(self):
        import tensorflow as tf

        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        rng = np.random.default_rng(0)
        logits = tf.constant(rng.normal(size=(64, 1000)) * 4, tf.float16)
        y = tf.constant(rng.integers(0, 1000, 64))
        values = Objective(loss).per_example_loss(y, logits)
        self.assertEqual(values.dtype, tf.float32)
        # Keras's own loss casts the float16 logits to float32 first.
        expected = float(loss(y, logits))
        self.assertAlmostEqual(float(tf.reduce_mean(values)), expected, places=5)
