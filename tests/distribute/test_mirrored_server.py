"""A server under tf.distribute.MirroredStrategy on two logical CPUs equals the
one-device server: the gradients it returns, its weights, its loss and
metrics; in a single message, in an in-process round robin, and over gRPC."""

import os

import keras
import numpy as np
import tensorflow as tf

from splitkeras import builders, distribute, launcher
from splitkeras import data as data_lib
from splitkeras.experiment import InProcess
from splitkeras.objective import Objective
from splitkeras.parties import Server
from splitkeras.protocol import Kind, Message
from tests import base
from tests.distributed.runs import loaded_segments as _loaded
from tests.distributed.runs import setup as _setup
from tests.distributed.runs import write_npz as _write_npz

SETTINGS = {"strategy": "mirrored", "logical_cpus": 2}


def _segment(batch_norm=True):
    """Conv (+ batch norm) -> ReLU -> Dense with a weight penalty; without
    batch norm the Dense layer also has an activity penalty (Keras divides
    it by the local batch, so uneven slices test its scaling)."""
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    activity = None if batch_norm else keras.regularizers.L2(0.5)
    h = keras.layers.Dense(3, kernel_regularizer="l2", activity_regularizer=activity)(h)
    return keras.Model(inputs, h)


def _servers(strategy, batch_norm=True):
    keras.utils.set_random_seed(0)
    segment = _segment(batch_norm)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # SGD: Adam's first steps turn rounding noise in near-zero gradients
    # into +-lr, which would test the noise rather than the gradients.
    single = Server(segment, keras.optimizers.SGD(0.1, momentum=0.9), Objective(loss))
    replica_segment = distribute.replicate(segment, strategy)
    with strategy.scope():
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    multi = Server(replica_segment, optimizer, Objective(loss), strategy=strategy)
    single.build_optimizer()
    multi.build_optimizer()
    return single, multi


def _in_process(config, strategy):
    """Server and last client segments after the in-process round robin."""
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    schedule = builders.build_schedule(config, arrays, strategy)
    process = InProcess(config, schedule, arrays)
    for epoch in range(config.train.epochs):
        schedule.train_epoch(process.datasets(epoch))
    test = schedule.evaluate(process.test)
    return schedule.server, schedule.clients[schedule.active], test


class MirroredServerTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.strategy = distribute.make_strategy(SETTINGS)
        cls.root = os.path.join(os.environ["TMPDIR"], "mirrored")
        os.makedirs(cls.root, exist_ok=True)
        cls.data = _write_npz(os.path.join(cls.root, "data.npz"), 128)

    def test_two_replicas(self):
        self.assertEqual(self.strategy.num_replicas_in_sync, 2)

    def test_messages_equal_one_device(self):
        single, multi = _servers(self.strategy)
        compiled = tf.function(
            lambda a, y, w: multi.handle(Message(Kind.TRAIN, 0, 1, (a,), y, w)).tensors
        )
        rng = np.random.default_rng(0)
        # Uneven batches (7 = 4 + 3), sample weights, eager and compiled.
        for batch, weighted, run in ((7, False, "eager"), (8, True, "compiled")):
            a = tf.constant(rng.normal(size=(batch, 6, 6, 4)), tf.float32)
            y = tf.constant(rng.integers(0, 3, batch), tf.int64)
            w = tf.constant(rng.uniform(size=batch), tf.float32) if weighted else None
            message = Message(Kind.TRAIN, 0, 1, (a,), y, w)
            expected = single.handle(message)
            if run == "eager":
                reply = multi.handle(message)
                got, loss = reply.tensors, reply.loss
                np.testing.assert_allclose(float(loss), float(expected.loss), atol=1e-5)
            else:
                got = compiled(a, y, w)
            np.testing.assert_allclose(
                got[0].numpy(), expected.tensors[0].numpy(), atol=1e-5
            )
            self.assertGreater(float(tf.reduce_max(tf.abs(got[0]))), 1e-3)
            self.assertWeightsClose(
                multi.segment.get_weights(), single.segment.get_weights()
            )
        self.assertEqual(
            multi.objective.result(training=True).keys(),
            single.objective.result(training=True).keys(),
        )
        for key, value in single.objective.result(training=True).items():
            self.assertAlmostEqual(multi.objective.result(training=True)[key], value, 5)
        a = tf.constant(rng.normal(size=(5, 6, 6, 4)), tf.float32)
        y = tf.constant(rng.integers(0, 3, 5), tf.int64)
        for kind in (Kind.PREDICT, Kind.EVALUATE):
            expected = single.handle(Message(kind, 0, 1, (a,), y))
            got = multi.handle(Message(kind, 0, 1, (a,), y))
            for e, g in zip(expected.tensors, got.tensors):
                np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5)
        self.assertAlmostEqual(
            multi.objective.result(training=False)["loss"],
            single.objective.result(training=False)["loss"],
            5,
        )

    def test_activity_penalty_and_batches_smaller_than_the_replicas(self):
        """Uneven slices (7 = 4 + 3) and a single example (padded to one row
        per replica) give the one-device loss, gradients and weights."""
        single, multi = _servers(self.strategy, batch_norm=False)
        rng = np.random.default_rng(3)
        for batch in (7, 1):
            a = tf.constant(rng.normal(size=(batch, 6, 6, 4)), tf.float32)
            y = tf.constant(rng.integers(0, 3, batch), tf.int64)
            message = Message(Kind.TRAIN, 0, 1, (a,), y)
            expected, got = single.handle(message), multi.handle(message)
            self.assertEqual(got.tensors[0].shape, a.shape)
            np.testing.assert_allclose(
                got.tensors[0].numpy(), expected.tensors[0].numpy(), atol=1e-6
            )
            np.testing.assert_allclose(float(got.loss), float(expected.loss), atol=1e-6)
            self.assertWeightsClose(
                multi.segment.get_weights(), single.segment.get_weights(), atol=1e-6
            )
        for kind in (Kind.PREDICT, Kind.EVALUATE):
            message = Message(kind, 0, 2, (a,), y)
            expected, got = single.handle(message), multi.handle(message)
            for e, g in zip(expected.tensors, got.tensors):
                self.assertEqual(g.shape, e.shape)
                np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5)
        self.assertAlmostEqual(
            multi.objective.result(training=False)["loss"],
            single.objective.result(training=False)["loss"],
            5,
        )

    def test_replicas_draw_different_dropout_masks(self):
        inputs = keras.Input((64,))
        outputs = keras.layers.Dense(2)(keras.layers.Dropout(0.5)(inputs))
        segment = keras.Model(inputs, outputs)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        copy = distribute.replicate(segment, self.strategy)
        with self.strategy.scope():
            optimizer = keras.optimizers.SGD(0.0)
        server = Server(copy, optimizer, Objective(loss), strategy=self.strategy)
        server.build_optimizer()
        # Identical rows: a row's input gradient is zero where it was dropped.
        a, y = tf.ones((4, 64)), tf.zeros([4], tf.int64)
        kept = server.handle(Message(Kind.TRAIN, 0, 1, (a,), y)).tensors[0] != 0
        kept = kept.numpy()
        self.assertFalse(np.array_equal(kept[:2], kept[2:]))  # replica 0 vs 1
        self.assertFalse(np.array_equal(kept[0], kept[1]))  # rows of one replica
        self.assertGreater(kept.mean(), 0.3)
        self.assertLess(kept.mean(), 0.7)

    def test_nested_batch_norm_is_synchronized(self):
        inner_inputs = keras.Input((4,))
        inner = keras.Model(
            inner_inputs, keras.layers.BatchNormalization()(inner_inputs)
        )
        inputs = keras.Input((4,))
        outer = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
        copy = distribute.replicate(outer, self.strategy)
        norms = [
            layer
            for model in copy.layers
            if isinstance(model, keras.Model)
            for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        self.assertLen(norms, 1)
        self.assertTrue(norms[0].synchronized)

    def test_ushaped_is_refused(self):
        with self.assertRaisesRegex(ValueError, "runs vanilla splits"):
            Server(_segment(), keras.optimizers.SGD(), None, strategy=self.strategy)

    def test_round_robin_in_process_and_over_grpc(self):
        config, args = _setup(
            self.data, **{"train.epochs": 1, "train.learning_rate": 0.01}
        )
        server, client, test = _in_process(config, None)
        mirrored, mirrored_client, mirrored_test = _in_process(config, self.strategy)
        self.assertIsNotNone(mirrored.strategy)
        self.assertWeightsClose(
            mirrored.segment.get_weights(), server.segment.get_weights()
        )
        self.assertWeightsClose(
            mirrored_client.segment.get_weights(), client.segment.get_weights()
        )
        self.assertAlmostEqual(mirrored_test["accuracy"], test["accuracy"], 6)

        # The same run with the server as a process on two logical CPUs.
        workdir = os.path.join(self.root, "grpc")
        args += ["--config.server.strategy=mirrored", "--config.server.logical_cpus=2"]
        summary = launcher.launch(args, workdir, config).wait(600)
        self.assertEqual(summary["steps"], 4)  # 2 clients x 2 batches of 32
        self.assertEqual(summary["server_replicas"], 2)
        loaded = _loaded(config, workdir, config.num_clients - 1)
        self.assertWeightsClose(
            loaded.server.get_weights(), server.segment.get_weights()
        )
        self.assertWeightsClose(
            loaded.client.get_weights(), client.segment.get_weights()
        )
