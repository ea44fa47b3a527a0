"""The learning rate of each epoch (config.train.lr_schedule)."""

import math

import keras
import ml_collections

from splitkeras import learning_rate
from tests import base


def _train(**fields):
    train = ml_collections.ConfigDict(
        {
            "learning_rate": 0.1,
            "epochs": 10,
            "lr_schedule": "constant",
            "lr_decay_epochs": "",
            "lr_decay_factor": 0.1,
            "warmup_epochs": 0,
        }
    )
    train.update(fields)
    return train


def _rates(train):
    return [learning_rate.for_epoch(train, e) for e in range(train.epochs)]


class LearningRateTest(base.TestCase):
    def test_constant(self):
        train = _train()
        self.assertEqual(_rates(train), [0.1] * 10)
        self.assertTrue(learning_rate.is_constant(train))
        self.assertIsNone(learning_rate.start_epoch(train, [], 3))

    def test_step(self):
        train = _train(lr_schedule="step", lr_decay_epochs="6,3")
        expected = [0.1] * 3 + [0.01] * 3 + [0.001] * 4
        for got, want in zip(_rates(train), expected):
            self.assertAlmostEqual(got, want, places=12)

    def test_cosine_with_warmup(self):
        train = _train(lr_schedule="cosine", warmup_epochs=3)
        rates = _rates(train)
        for e, want in enumerate([0.025, 0.05, 0.075]):  # 0.1 * (e + 1) / 4
            self.assertAlmostEqual(rates[e], want, places=12)
        self.assertAlmostEqual(rates[3], 0.1, places=12)
        self.assertAlmostEqual(rates[9], 0.05 * (1 + math.cos(math.pi * 6 / 7)))
        self.assertTrue(all(a > b for a, b in zip(rates[3:], rates[4:])))
        self.assertFalse(learning_rate.is_constant(train))

    def test_bad_settings_are_named(self):
        cases = [
            (_train(lr_schedule="linear"), "unknown config.train.lr_schedule 'linear'"),
            (_train(lr_schedule="step"), "needs config.train.lr_decay_epochs"),
            (_train(lr_schedule="step", lr_decay_epochs="a"), "got 'a'"),
            (_train(warmup_epochs=10), "warmup_epochs=10 must be in"),
        ]
        for train, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                learning_rate.for_epoch(train, 0)

    def test_start_epoch_sets_every_optimizer(self):
        train = _train(lr_schedule="step", lr_decay_epochs="2", lr_decay_factor=0.5)
        plain = keras.optimizers.SGD(0.1)
        scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.1))
        for o in (plain, scaled):
            o.build([keras.Variable(1.0)])
        self.assertEqual(learning_rate.start_epoch(train, [plain, scaled], 2), 0.05)
        for o in (plain, scaled):
            self.assertAlmostEqual(float(o.learning_rate), 0.05, places=7)
        self.assertAlmostEqual(float(scaled.inner_optimizer.learning_rate), 0.05, 7)
