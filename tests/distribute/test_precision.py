"""Mixed precision and XLA: each party's loss scale stays its own (the client
gets true gradients, neither scaled nor unscaled twice), overflow skips the
step on both sides, and XLA-compiled steps equal the plain ones."""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras import builders, distribute
from splitkeras import data as data_lib
from splitkeras.experiment import InProcess
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.segment_step import Dispatched
from splitkeras.privacy.defenses import ClientPrivacy
from splitkeras.protocol import Kind, Message
from splitkeras.split_model import SplitModel
from tests import base
from tests.distributed.runs import setup as _setup
from tests.distributed.runs import write_npz as _write_npz

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
ONE = {"num_clients": 1}  # topologies of one client


@contextlib.contextmanager
def _policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _server_segment():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _client_segment():
    inputs = keras.Input((8, 8, 2))
    return keras.Model(inputs, keras.layers.Conv2D(3, 1, padding="same")(inputs))


def _pair(build):
    """(float32 model, mixed_float16 model) with the same weights."""
    keras.utils.set_random_seed(0)
    full = build()
    with _policy("mixed_float16"):
        half = build()
    half.set_weights(full.get_weights())
    return full, half


def _max(x):
    return float(tf.reduce_max(tf.abs(x)))


class LossScaleTest(base.TestCase):
    def _message(self):
        rng = np.random.default_rng(0)
        a = tf.constant(rng.normal(size=(6, 8, 8, 3)), tf.float32)
        y = tf.constant(rng.integers(0, 3, 6), tf.int64)
        return Message(Kind.TRAIN, 0, 1, (a,), y)

    def test_server_sends_unscaled_gradients(self):
        full, half = _pair(_server_segment)
        reference = Server(full, keras.optimizers.SGD(0.1), Objective(LOSS))
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        server = Server(half, optimizer, Objective(LOSS))
        before = half.get_weights()
        expected = reference.handle(self._message())
        reply = server.handle(self._message())
        (got,), (want,) = reply.tensors, expected.tensors
        self.assertEqual(got.dtype, tf.float32)  # 16-bit cut tensors cross as float32
        self.assertGreater(optimizer.scale_loss(1.0), 1000)  # a real loss scale
        # Equal to the float32 gradients up to float16 precision: not scaled.
        self.assertLess(_max(got - want), 1e-2 * _max(want))
        self.assertWeightsClose(half.get_weights(), full.get_weights(), atol=2e-3)
        moved = max(np.abs(a - b).max() for a, b in zip(half.get_weights(), before))
        self.assertGreater(moved, 1e-3)

    def test_overflow_skips_the_step_and_sends_zeros(self):
        _, half = _pair(_server_segment)
        before = half.get_weights()
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=1e30
        )
        server = Server(half, optimizer, Objective(LOSS))
        reply = server.handle(self._message())
        self.assertEqual(_max(reply.tensors[0]), 0.0)  # no Inf/NaN reaches a client
        self.assertWeightsClose(half.get_weights(), before, atol=0)
        self.assertLess(float(optimizer.scale_loss(1.0)), 1e30)  # scale backed off

    def _client_update(self, name, x, g, lr, privacy=None) -> list:
        """Minus the weight change of one client step with SGD(lr): float32,
        float16, or float16 with loss scaling ("float16_scaled")."""
        full, half = _pair(_client_segment)
        segment = full if name == "float32" else half
        before = segment.get_weights()
        optimizer = keras.optimizers.SGD(lr)
        if name == "float16_scaled":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        client = Client(segment, optimizer, privacy=privacy)
        forward = client.forward(x)
        self.assertEqual(forward.cut[0].dtype, tf.float32)
        client.backward(forward, [g])
        return [b - a for b, a in zip(before, segment.get_weights())]

    def test_client_scales_its_own_backward(self):
        rng = np.random.default_rng(1)
        x = tf.constant(rng.normal(size=(4, 8, 8, 2)), tf.float32)
        # Gradients this small underflow in float16 unless scaled.
        g = tf.constant(rng.normal(size=(4, 8, 8, 3)) * 1e-9, tf.float32)
        updates = {
            name: self._client_update(name, x, g, 1e7)[0]
            for name in ("float32", "float16", "float16_scaled")
        }
        self.assertGreater(np.abs(updates["float32"]).max(), 1e-2)
        self.assertEqual(np.abs(updates["float16"]).max(), 0.0)  # underflowed
        np.testing.assert_allclose(
            updates["float16_scaled"],
            updates["float32"],
            atol=2e-2 * np.abs(updates["float32"]).max(),
        )

    def test_normalized_nopeek_under_loss_scaling_equals_float32(self):
        rng = np.random.default_rng(2)
        x = tf.constant(rng.random((16, 8, 8, 2)), tf.float32)
        g = tf.constant(rng.normal(size=(16, 8, 8, 3)) * 0.01, tf.float32)
        updates = {
            name: self._client_update(
                name, x, g, 1.0, ClientPrivacy(nopeek_alpha=0.5, nopeek_window=0)
            )
            for name in ("float32", "float16_scaled")
        }
        for scaled, plain in zip(updates["float16_scaled"], updates["float32"]):
            self.assertGreater(np.abs(plain).max(), 0.0)
            np.testing.assert_allclose(scaled, plain, atol=2e-2 * np.abs(plain).max())


class RunTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        root = os.path.join(os.environ["TMPDIR"], "precision")
        os.makedirs(root, exist_ok=True)
        cls.data = _write_npz(os.path.join(root, "data.npz"), 128)

    def _train(self, **overrides):
        config, _ = _setup(self.data, **{"train.epochs": 1, **overrides})
        arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
        schedule = builders.build_schedule(config, arrays)
        self.process = InProcess(config, schedule, arrays)
        logs = schedule.train_epoch(self.process.datasets(0))
        return schedule, logs

    def test_xla_equals_plain(self):
        sgd = {"train.optimizer": "sgd", "train.learning_rate": 0.05}
        plain, _ = self._train(**sgd)
        xla, _ = self._train(**sgd, **{"train.jit_compile": True})
        self.assertTrue(all(f._jit_compile for f in _step_functions(xla)))
        self.assertWeightsClose(
            xla.server.segment.get_weights(), plain.server.segment.get_weights()
        )
        self.assertWeightsClose(
            xla.clients[1].segment.get_weights(), plain.clients[1].segment.get_weights()
        )

    def test_split_model_fit_with_xla_equals_plain(self):
        weights = {}
        for jit in (False, True):
            settings = {"num_clients": 1, "train.optimizer": "sgd"}
            config, _ = _setup(self.data, **settings, **{"train.jit_compile": jit})
            arrays = data_lib.load(config.data.name, config.data.path, False)
            trainer = SplitModel(
                builders.build_model(config, arrays),
                builders.cut_layers(config),
                codec=builders.codecs(config),
            )
            trainer.compile(
                client_optimizer=builders.make_optimizer(config),
                server_optimizer=builders.make_optimizer(config),
                loss=builders.make_loss(),
                metrics=["accuracy"],
                jit_compile=jit,
            )
            dataset = data_lib.train_dataset(
                arrays.x_train, arrays.y_train, 32, config.seed, 0
            )
            trainer.fit(dataset, epochs=1, verbose=0)
            self.assertEqual(bool(trainer.jit_compile), jit)
            weights[jit] = trainer.get_weights()
        self.assertWeightsClose(weights[True], weights[False])

    def test_grpc_host_steps_compile_with_xla(self):
        from splitkeras.protocol import Kind
        from splitkeras.transport.grpc_host import GrpcHost

        full, served = _server_segment(), _server_segment()
        served.set_weights(full.get_weights())
        reference = Server(full, keras.optimizers.SGD(0.1), Objective(LOSS))
        server = Server(served, keras.optimizers.SGD(0.1), Objective(LOSS))
        host = GrpcHost({"server": server}, 1, jit_compile=True)
        train = host.steps.function("server", server, Kind.TRAIN)
        self.assertTrue(train._jit_compile)
        message = LossScaleTest._message(self)
        step = tf.constant(1, tf.int64)
        grads, loss = train(
            step, list(message.tensors), message.labels, None, None, None
        )
        expected = reference.handle(message)
        np.testing.assert_allclose(
            grads[0].numpy(), expected.tensors[0].numpy(), atol=1e-5
        )
        self.assertAlmostEqual(float(loss), float(expected.loss), places=5)
        self.assertWeightsClose(served.get_weights(), full.get_weights())

    @parameterized.named_parameters(
        ("ushaped", {"topology": "ushaped", "model.cut": "pool1,fc2"}),
        ("splitfed_v1", {"method": "splitfed_v1"}),
        ("vertical", {"topology": "vertical"}),
        ("multihop", {"topology": "multihop", "model.cut": "pool1,fc1", **ONE}),
        ("multitask", {"topology": "multitask", "model.cut": "fc2", **ONE}),
        ("fedavg", {"method": "fedavg"}),
        ("large_batch_sgd", {"method": "large_batch_sgd"}),
    )
    def test_every_schedule_compiles_with_xla(self, overrides):
        settings = {
            "train.optimizer": "sgd",
            "train.learning_rate": 0.05,
            "multitask.groups": "0,1,1",
            **overrides,
        }
        results = {}
        for jit in (False, True):
            schedule, _ = self._train(**settings, **{"train.jit_compile": jit})
            functions = _step_functions(schedule)
            self.assertNotEmpty(functions)
            self.assertTrue(all(bool(f._jit_compile) == jit for f in functions))
            results[jit] = schedule.evaluate(self.process.test)
        self.assertEqual(results[True].keys(), results[False].keys())
        for key, value in results[False].items():
            self.assertAlmostEqual(results[True][key], value, places=4, msg=key)

    def test_mixed_float16_trains_with_float32_weights(self):
        schedule, logs = self._train(**{"train.mixed_precision": "mixed_float16"})
        self.assertTrue(np.isfinite(logs["loss"]))
        server = schedule.server
        self.assertIsInstance(server.optimizer, keras.optimizers.LossScaleOptimizer)
        self.assertEqual(server.segment.layers[1].compute_dtype, "float16")
        for weight in server.segment.weights + schedule.clients[0].segment.weights:
            self.assertEqual(weight.dtype, "float32")

    def test_mixed_float16_needs_vanilla(self):
        config, _ = _setup(
            self.data,
            **{"train.mixed_precision": "mixed_float16", "model.cut": "pool1,fc2"},
        )
        config.topology = "ushaped"
        with self.assertRaisesRegex(ValueError, "use mixed_bfloat16"):
            builders.make_optimizer(config)


def _step_functions(schedule) -> list:
    """The `tf.function`s a schedule compiled its steps into (not the vertical
    server's id check, which runs beside an XLA step: XLA cannot hold it)."""
    found = []
    owners = [schedule, *getattr(schedule, "programs", ())]
    for owner in owners:
        for name, value in vars(owner).items():
            if name == "_check_fn":
                continue
            for item in value if isinstance(value, list | tuple) else [value]:
                if isinstance(item, Dispatched):  # segment_step.compiled's
                    item = item.function
                if isinstance(item, tf.types.experimental.PolymorphicFunction):
                    found.append(item)
    return found


class DistributedLossScaleTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.strategy = distribute.make_strategy(
            {"strategy": "mirrored", "logical_cpus": 2}
        )

    def _servers(self, initial_scale=2.0**15):
        _, half = _pair(_server_segment)

        def scaled():
            return keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1), initial_scale=initial_scale
            )

        replica = distribute.replicate(half, self.strategy)
        with self.strategy.scope():
            optimizer = scaled()
        multi = Server(replica, optimizer, Objective(LOSS), strategy=self.strategy)
        single = Server(half, scaled(), Objective(LOSS))
        return single, multi

    def test_mirrored_float16_server_equals_one_device(self):
        single, multi = self._servers()
        message = LossScaleTest._message(self)
        expected, got = single.handle(message), multi.handle(message)
        (g,), (e,) = got.tensors, expected.tensors
        self.assertLess(_max(g - e), 1e-2 * _max(e))  # not 32768x off
        self.assertGreater(_max(e), 1e-3)
        self.assertWeightsClose(
            multi.segment.get_weights(), single.segment.get_weights(), atol=1e-3
        )

    def test_an_overflow_on_one_replica_skips_every_replica(self):
        _, multi = self._servers()
        before = multi.segment.get_weights()
        message = LossScaleTest._message(self)
        # Only the second replica's slice (rows 3-5) overflows in float16.
        a = message.tensors[0].numpy()
        a[3:] *= 3e3
        reply = multi.handle(message.replace(tensors=(tf.constant(a),)))
        self.assertEqual(_max(reply.tensors[0]), 0.0)
        self.assertWeightsClose(multi.segment.get_weights(), before, atol=0)
        self.assertEqual(float(multi.optimizer.scale_loss(1.0)), 2.0**14)  # halved once

    def test_client_skips_when_the_server_skipped(self):
        _, half = _pair(_client_segment)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1, momentum=0.9)
        )
        client = Client(half, optimizer)
        x = tf.constant(np.random.default_rng(2).normal(size=(4, 8, 8, 2)), tf.float32)
        g = tf.ones((4, 8, 8, 3)) * 0.1
        client.backward(client.forward(x), [g])  # momentum now carries a step
        before, steps = half.get_weights(), int(optimizer.iterations)
        scale = float(optimizer.scale_loss(1.0))
        client.backward(client.forward(x), [tf.zeros_like(g)])  # server skipped
        self.assertWeightsClose(half.get_weights(), before, atol=0)
        self.assertEqual(int(optimizer.iterations), steps)
        # The overflow was not this client's: its own loss scale stays.
        self.assertEqual(float(optimizer.scale_loss(1.0)), scale)

    def test_a_skipped_update_leaves_nopeeks_window_and_alpha(self):
        _, half = _pair(_client_segment)
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        privacy = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_window=8, nopeek_target=0.01, nopeek_adapt=100.0
        )
        client = Client(half, optimizer, privacy=privacy)
        x = tf.constant(np.random.default_rng(2).normal(size=(4, 8, 8, 2)), tf.float32)
        g = tf.ones((4, 8, 8, 3)) * 1e-4
        # This client's own overflow, then the server's: neither update is
        # applied, and neither moves the window or alpha.
        for gradients in (g * 1e7, tf.zeros_like(g)):
            client.backward(client.forward(x), [gradients])
            self.assertEqual(int(optimizer.iterations), 0)
            self.assertEqual(int(privacy._memory[2]), 0)
            self.assertEqual(privacy.adapted_alpha, 0.5)
        client.backward(client.forward(x), [g])
        self.assertEqual(int(optimizer.iterations), 1)
        self.assertEqual(int(privacy._memory[2]), 4)
        self.assertEqual(privacy.adapted_alpha, 5.0)

    def test_client_backs_off_on_its_own_overflow(self):
        _, half = _pair(_client_segment)
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        client = Client(half, optimizer)
        x = tf.constant(np.random.default_rng(2).normal(size=(4, 8, 8, 2)), tf.float32)
        before = half.get_weights()
        client.backward(client.forward(x), [tf.ones((4, 8, 8, 3)) * 1e3])
        self.assertWeightsClose(half.get_weights(), before, atol=0)
        self.assertEqual(float(optimizer.scale_loss(1.0)), 2.0**14)


class RefusedTest(base.TestCase):
    def test_unsupported_combinations_are_refused(self):
        config, _ = _setup("unused.npz")
        strategy = distribute.make_strategy({"strategy": "mirrored", "logical_cpus": 2})
        config.train.jit_compile = True
        with self.assertRaisesRegex(ValueError, "inside an XLA-compiled function"):
            distribute.check_supported(config, strategy)
        config.train.jit_compile = False
        config.method = "fedavg"
        with self.assertRaisesRegex(ValueError, "split round robin"):
            distribute.check_supported(config, strategy)
        config.train.mixed_precision = "mixed_float16"
        with self.assertRaisesRegex(ValueError, "method='fedavg'"):
            builders.make_optimizer(config)
        objective = Objective(
            keras.losses.SparseCategoricalCrossentropy(reduction="sum")
        )
        with self.assertRaisesRegex(ValueError, "reduction 'sum' is not supported"):
            objective.per_example_loss(tf.constant([0]), tf.constant([[1.0, 2.0]]))
