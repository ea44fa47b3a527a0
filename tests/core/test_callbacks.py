"""Keras callbacks work with SplitModel.fit as with keras.Model.fit."""

import glob
import os

import keras
import numpy as np
import tensorflow as tf

import splitkeras
from tests import base, tiny_models


def _data():
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 64)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def _split():
    split = splitkeras.SplitModel(tiny_models.bn_dropout_model(), "relu1")
    split.compile(
        keras.optimizers.Adam(1e-2),
        keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return split


class CallbacksTest(base.TestCase):
    def test_history_has_train_and_validation_metrics(self):
        ds = _data()
        history = _split().fit(ds, validation_data=ds, epochs=2, verbose=0)
        self.assertEqual(
            sorted(history.history), ["accuracy", "loss", "val_accuracy", "val_loss"]
        )
        self.assertLen(history.history["loss"], 2)

    def test_early_stopping_stops_and_restores_best_weights(self):
        ds = _data()
        split = _split()
        # Watch the loss going *up*: it rarely does, so training stops
        # `patience` epochs after the best epoch, long before 10.
        stop = keras.callbacks.EarlyStopping(
            monitor="loss", mode="max", patience=2, restore_best_weights=True
        )
        first = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: weights.append(split.get_weights())
        )
        weights = []
        history = split.fit(ds, epochs=10, callbacks=[first, stop], verbose=0)
        best = int(np.argmax(history.history["loss"]))
        self.assertLen(history.history["loss"], best + 3)
        self.assertWeightsClose(split.get_weights(), weights[best], atol=0)

    def test_model_checkpoint_saves_weights_that_load_back(self):
        ds = _data()
        split = _split()
        path = os.path.join(self.tempdir(), "split.weights.h5")
        save = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
        split.fit(ds, epochs=1, callbacks=[save], verbose=0)
        saved = split.get_weights()
        split.fit(ds, epochs=1, verbose=0)
        split.load_weights(path)
        self.assertWeightsClose(split.get_weights(), saved, atol=0)

    def test_tensorboard_callback_writes_train_and_validation_events(self):
        ds = _data()
        logdir = self.tempdir()
        board = keras.callbacks.TensorBoard(logdir)
        _split().fit(ds, validation_data=ds, epochs=1, callbacks=[board], verbose=0)
        for sub in ("train", "validation"):
            self.assertTrue(glob.glob(os.path.join(logdir, sub, "events.out.*")), sub)
