"""Export of client segments: SavedModel and LiteRT give Keras's outputs and
Keras's training step (forward, gradients of the cut tensors, optimizer)."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.cut import cut
from splitkeras.edge.runtime import LiteSegment
from splitkeras.export import LiteConversionError, export_segment, gradients
from splitkeras.models.registry import build_model
from splitkeras.parties import Client
from splitkeras.transport.sealing import HandoffError
from tests import base

# (model, input shape, cut, builder kwargs): a conv + pool (LeNet), conv/BN/
# ReLU blocks (VGG), a residual block with a skip connection (ResNet), an
# 11x11 stride-4 conv and an overlapping 3x3/2 max pool (AlexNet).
MODELS = {
    "lenet5": ((28, 28, 1), "pool1", {}),
    "vgg16": ((32, 32, 3), "block1_pool", {"width": 0.25}),
    "resnet18": ((32, 32, 3), "stage1_block1_out", {"width": 0.25}),
    "alexnet": ((67, 67, 3), "pool1", {}),
}


def _segment(name):
    shape, layer, kwargs = MODELS[name]
    model = build_model(name, input_shape=shape, num_classes=10, **kwargs)
    return cut(model, layer).client


def _keras_step(segment, optimizer, x, grads):
    """The Keras client's step: `Client.forward`, then `Client.backward`."""
    client = Client(segment, optimizer)
    client.backward(client.forward(tf.constant(x)), [tf.constant(grads)])


def _state(segment, optimizer):
    return [np.asarray(v.numpy()) for v in segment.variables + optimizer.variables]


def _assert_state_close(test, got, expected, tol):
    """Each array within `tol` x max(1, its largest magnitude): weights are
    O(1), Adam's moments scale with gradients that reach the hundreds."""
    test.assertEqual(len(got), len(expected))
    for i, (a, b) in enumerate(zip(got, expected)):
        test.assertEqual(a.shape, b.shape, f"state {i}")
        if b.size:
            bound = tol * max(1.0, float(np.abs(b).max()))
            diff = float(np.abs(a.astype(np.float64) - b).max())
            test.assertLessEqual(diff, bound, f"state {i} differs by {diff}")


class ExportTest(base.TestCase):
    @parameterized.named_parameters((name, name) for name in MODELS)
    def test_outputs_and_training_step_equal_keras(self, name):
        segment = _segment(name)
        # Adam's first step is lr * g / (|g| + epsilon): with the default
        # epsilon (1e-7) a gradient element that is rounding noise (~1e-9)
        # still moves its weight by +-lr, whichever way the rounding went. A
        # larger epsilon keeps the update continuous in the gradient, so the
        # comparison measures the gradients, not the sign of noise.
        optimizer = keras.optimizers.Adam(1e-2, epsilon=0.1)
        rng = np.random.default_rng(0)
        x = rng.uniform(size=(5, *MODELS[name][0])).astype(np.float32)
        out = self.tempdir()
        # Quantized variants once (benchmarks/export.py measures them all).
        quantize = ("float16", "int8") if name == "lenet5" else ()
        report = export_segment(segment, optimizer, out, sample=x, quantize=quantize)
        artifacts = report["artifacts"]
        self.assertLessEqual(artifacts["saved_model"]["max_abs_diff"], 1e-5)
        self.assertLessEqual(artifacts["client.tflite"]["max_abs_diff"], 1e-4)
        for q in quantize:
            self.assertLessEqual(
                artifacts[f"client_serve_{q}.tflite"]["max_abs_diff"], 1e-2
            )
        with open(os.path.join(out, "export.json")) as f:
            self.assertEqual(json.load(f)["artifacts"].keys(), artifacts.keys())

        self._check_training_step(segment, optimizer, out)

    def _check_training_step(self, segment, optimizer, out):
        """forward + backward of the SavedModel and of LiteRT = a Keras step."""
        rng = np.random.default_rng(1)
        # A batch size other than the sample's (dynamic batch dimension).
        x = rng.uniform(size=(3, *segment.inputs[0].shape[1:])).astype(np.float32)
        cut_shape = segment.outputs[0].shape[1:]
        g = rng.normal(size=(3, *cut_shape)).astype(np.float32)
        loaded = tf.saved_model.load(os.path.join(out, "saved_model"))
        lite = LiteSegment(os.path.join(out, "client.tflite"))
        # Training-mode forward passes (each moves batch-norm statistics once).
        keras_cut = segment(x, training=True).numpy()
        saved_cut = loaded.signatures["forward"](x=tf.constant(x))["cut_0"].numpy()
        np.testing.assert_allclose(saved_cut, keras_cut, atol=1e-5)
        np.testing.assert_allclose(lite.forward(x)[0], keras_cut, atol=1e-4)
        before = _state(segment, optimizer)
        self.assertWeightsClose(lite.state(), before, atol=1e-6)

        _keras_step(segment, optimizer, x, g)
        expected = _state(segment, optimizer)
        loaded.signatures["forward"](x=tf.constant(x))
        loaded.signatures["backward"](x=tf.constant(x), grad_0=tf.constant(g))
        saved_state = loaded.signatures["save"]()
        got = [saved_state[f"state_{i:03d}"].numpy() for i in range(len(expected))]
        _assert_state_close(self, got, expected, 1e-5)

        lite.forward(x)
        self.assertEqual(lite.backward(x, [g]), 1)
        _assert_state_close(self, lite.state(), expected, 1e-4)
        # The update moved the weights (so equality above is not vacuous).
        moved = max(np.abs(a - b).max() for a, b in zip(expected, before) if a.size)
        self.assertGreater(moved, 1e-3)

        # restore puts any state back (e.g. a handoff from a Keras client).
        lite.load_state(before)
        self.assertWeightsClose(lite.state(), before, atol=0)
        # ... but not one that does not fit (LiteRT would resize silently).
        wrong = [before[0][:1], *before[1:]]
        with self.assertRaisesRegex(HandoffError, "handed-off variable 0 is"):
            lite.load_state(wrong)
        self.assertWeightsClose(lite.state(), before, atol=0)

    def test_other_layers_training_step(self):
        """Padding, regularizers, LeakyReLU, global pooling, tanh, sigmoid."""
        layers = keras.layers
        inputs = keras.Input((9, 9, 2))
        h = layers.ZeroPadding2D(1)(inputs)
        h = layers.Conv2D(4, 3, kernel_regularizer="l2")(h)
        h = layers.LeakyReLU(negative_slope=0.2)(h)
        h = layers.GlobalAveragePooling2D()(h)
        h = layers.Dense(6, activation="tanh")(h)
        h = layers.Dense(5, activation="sigmoid")(h)
        segment = keras.Model(inputs, h)
        optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
        out = self.tempdir()
        report = export_segment(segment, optimizer, out, quantize=())
        self.assertLessEqual(report["artifacts"]["client.tflite"]["max_abs_diff"], 1e-4)
        self._check_training_step(segment, optimizer, out)


class LiteGradientsTest(base.TestCase):
    @parameterized.parameters(
        ("SAME", 1, 3),
        ("VALID", 2, 3),
        ("SAME", 2, 3),
        ("VALID", 2, 2),
        ("SAME", 3, 2),
    )
    def test_conv_and_pool_gradients_equal_tensorflow(self, padding, stride, pool):
        """Builtin-only rules equal TF's gradients, inputs included, with ties."""
        inputs = keras.Input((11, 9, 3))
        h = keras.layers.Conv2D(4, 3, strides=stride, padding=padding.lower())(inputs)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D(pool, strides=2, padding=padding.lower())(h)
        h = keras.layers.Conv2D(2, 2, padding="same", activation="relu6")(h)
        model = keras.Model(inputs, h)
        rng = np.random.default_rng(1)
        # Rounded inputs make ties inside pooling windows likely.
        x = tf.constant(np.round(rng.normal(size=(2, 11, 9, 3)) * 2) / 2, tf.float32)
        g = tf.constant(rng.normal(size=(2, *h.shape[1:])), tf.float32)
        variables = [v.value for v in model.trainable_variables]

        @tf.function
        def lite(x):
            with gradients.override_gradients():
                y = model(x)
            return tf.gradients(y, [x, *variables], grad_ys=g)

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        expected = tape.gradient(y, [x, *model.trainable_variables], g)
        for got, want in zip(lite(x), expected):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)

    def test_broadcast_over_unknown_dimension_is_refused(self):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None]),
                tf.TensorSpec([None, 3]),
            ]
        )
        def add_grad(x, y):
            with gradients.override_gradients():
                z = x + y
            return tf.gradients(z, [x, y])

        with self.assertRaisesRegex(ValueError, "needs static shapes"):
            add_grad.get_concrete_function()

    def test_op_without_builtin_gradient_is_named(self):
        inputs = keras.Input((8, 8, 2))
        h = keras.layers.Conv2D(2, 3)(inputs)
        h = keras.layers.AveragePooling2D(2)(h)
        segment = keras.Model(inputs, h)
        with self.assertRaisesRegex(LiteConversionError, "AvgPoolGrad"):
            export_segment(segment, keras.optimizers.SGD(), self.tempdir())
        # Inference alone converts.
        report = export_segment(
            segment, keras.optimizers.SGD(), self.tempdir(), training=False
        )
        self.assertLessEqual(report["artifacts"]["client.tflite"]["max_abs_diff"], 1e-4)


class ExportFromWorkdirTest(base.TestCase):
    def test_a_client_workdir_exports_its_trained_weights(self):
        from splitkeras import experiment
        from splitkeras.edge import EdgeSpec
        from splitkeras.export import export_from_workdir
        from tests.distributed.test_grpc_run import _setup, _write_npz

        root = self.tempdir()
        config, _ = _setup(_write_npz(os.path.join(root, "data.npz"), 32))
        segments = experiment.build_segments(config, experiment.load_data(config))
        trained = [w + 0.5 for w in segments.client.get_weights()]
        segments.client.set_weights(trained)
        workdir = os.path.join(root, "client_0")
        os.makedirs(workdir)
        segments.client.save_weights(os.path.join(workdir, "client.weights.h5"))
        out = os.path.join(root, "export")
        report = export_from_workdir(config, workdir, out, quantize=())
        self.assertEqual(
            report["restored_from"],
            {"client": os.path.join(workdir, "client.weights.h5")},
        )
        lite = LiteSegment(os.path.join(out, "client.tflite"))
        self.assertWeightsClose(lite.state()[: len(trained)], trained, atol=0)
        spec = EdgeSpec.read(os.path.join(out, "edge.json"))
        self.assertEqual(spec.num_clients, config.num_clients)
        self.assertTrue(os.path.isdir(os.path.join(out, "server_saved_model")))

    def test_a_workdir_without_weights_is_refused(self):
        from splitkeras.export import export_from_workdir
        from tests.distributed.test_grpc_run import _setup, _write_npz

        root = self.tempdir()
        config, _ = _setup(_write_npz(os.path.join(root, "data.npz"), 32))
        with self.assertRaisesRegex(FileNotFoundError, "neither client.weights.h5"):
            export_from_workdir(config, root, os.path.join(root, "export"))
