"""Export of client segments: SavedModel and LiteRT give Keras's outputs and
Keras's training step (forward, gradients of the cut tensors, optimizer);
state hands over between Keras and LiteRT; export from a run's workdir and
its command line."""

import json
import os
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras import builders
from splitkeras.cut import cut
from splitkeras.edge.runtime import LiteSegment, interpreter
from splitkeras.export import (
    LiteConversionError,
    export_segment,
    gradients,
    litert,
    to_litert,
)
from splitkeras.models.registry import build_model
from splitkeras.parties import Client
from splitkeras.parties.handoff import pack_state, unpack_state
from splitkeras.transport.sealing import HandoffError, pack_arrays, unpack_arrays
from tests import base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (model, input shape, cut, builder kwargs): a conv + pool (LeNet), conv/BN/
# ReLU blocks (VGG), a residual block with a skip connection (ResNet), an
# 11x11 stride-4 conv and an overlapping 3x3/2 max pool (AlexNet).
MODELS = {
    "lenet5": ((28, 28, 1), "pool1", {}),
    "vgg16": ((32, 32, 3), "block1_pool", {"width": 0.25}),
    "resnet18": ((32, 32, 3), "stage1_block1_out", {"width": 0.25}),
    "alexnet": ((67, 67, 3), "pool1", {}),
}


# Quantized variants are checked on VGG, whose block1_conv2 kernel (2,304
# elements) is big enough to be quantized (the converter leaves tensors under
# 1,024 elements in float, so LeNet's int8 file is float). Measured with the
# seeded weights: float16 1.8e-4, int8 4.0e-3; bounds with 2.5-3x margin.
QUANTIZED = {"vgg16": {"float16": 5e-4, "int8": 1e-2}}


def _segment(name):
    shape, layer, kwargs = MODELS[name]
    keras.utils.set_random_seed(0)  # the quantization errors depend on weights
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
        bounds = QUANTIZED.get(name, {})
        report = export_segment(
            segment, optimizer, out, sample=x, quantize=tuple(bounds)
        )
        artifacts = report["artifacts"]
        self.assertLessEqual(artifacts["saved_model"]["max_abs_diff"], 1e-5)
        self.assertLessEqual(artifacts["client.tflite"]["max_abs_diff"], 1e-4)
        with open(os.path.join(out, "export.json")) as f:
            self.assertEqual(json.load(f)["artifacts"].keys(), artifacts.keys())
        if bounds:
            self._check_quantized(out, artifacts, bounds)
        self._check_training_step(segment, optimizer, out)

    def _check_quantized(self, out, artifacts, bounds):
        """Each variant is quantized (smaller than the float32 serve model,
        outputs not float-exact), within its bound, and inference only."""
        float_serve = len(to_litert(os.path.join(out, "serve_saved_model"), ["serve"]))
        for q, bound in bounds.items():
            name = f"client_serve_{q}.tflite"
            artifact = artifacts[name]
            lite = interpreter(os.path.join(out, name))
            self.assertEqual(list(lite.get_signature_list()), ["serve"], q)
            self.assertLess(artifact["bytes"], float_serve, q)
            self.assertGreater(artifact["max_abs_diff"], 1e-5, q)  # float: ~2e-7
            self.assertLessEqual(artifact["max_abs_diff"], bound, q)

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

        # A state restored between forward and backward, batch-norm
        # statistics included, is the one backward starts from.
        lite.forward(x)
        lite.load_state(before)
        lite.backward(x, [g])
        _assert_state_close(self, lite.state(), expected, 1e-4)

        # restore puts any state back (e.g. a handoff from a Keras client).
        lite.load_state(before)
        self.assertWeightsClose(lite.state(), before, atol=0)
        # ... but not one that does not fit (LiteRT would resize silently).
        wrong = [before[0][:1], *before[1:]]
        with self.assertRaisesRegex(HandoffError, "handed-off variable 0 is"):
            lite.load_state(wrong)
        self.assertWeightsClose(lite.state(), before, atol=0)

        # A Keras client's handoff (after its step: moved weights, Adam
        # moments, iterations) -> LiteRT -> a fresh Keras client, exactly.
        keras_client = Client(segment, optimizer)
        lite.load_state(unpack_arrays(pack_state(keras_client)))
        self.assertWeightsClose(lite.state(), expected, atol=0)
        segment_copy = keras.models.clone_model(segment)
        receiver = Client(
            segment_copy, optimizer.__class__.from_config(optimizer.get_config())
        )
        receiver.build_optimizer()
        unpack_state(receiver, pack_arrays(lite.state()))
        self.assertWeightsClose(
            _state(segment_copy, receiver.optimizer), expected, atol=0
        )

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

    def test_mixed_precision_cut_tensors_cross_in_float32(self):
        """As a Keras client sends them (wire_dtype), so the server takes them;
        LiteRT (float32 kernels) and on-device training are refused."""
        from splitkeras.export import TrainableSegment

        keras.config.set_dtype_policy("mixed_float16")
        try:
            segment = _segment("lenet5")
        finally:
            keras.config.set_dtype_policy("float32")
        self.assertEqual(segment.outputs[0].dtype, "float16")
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
        module = TrainableSegment(segment, optimizer)
        serve = module.signatures(["serve", "forward"])
        for key in ("serve", "forward"):
            self.assertEqual(serve[key].structured_outputs["cut_0"].dtype, tf.float32)
        with self.assertRaisesRegex(ValueError, "does not scale its loss"):
            module.signatures()
        out = os.path.join(self.tempdir(), "export")
        with self.assertRaisesRegex(ValueError, "computes in float16"):
            export_segment(segment, optimizer, out, training=False)
        self.assertFalse(os.path.exists(out))


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
        # Other converter errors are not said to be missing kernels.
        converter = mock.Mock()
        converter.convert.side_effect = RuntimeError("the converter broke")
        with mock.patch.object(litert, "_converter", return_value=converter):
            with self.assertRaisesRegex(RuntimeError, "the converter broke"):
                to_litert("unused", ["serve"])
        # Inference alone converts.
        report = export_segment(
            segment, keras.optimizers.SGD(), self.tempdir(), training=False
        )
        self.assertLessEqual(report["artifacts"]["client.tflite"]["max_abs_diff"], 1e-4)


class ExportFromWorkdirTest(base.TestCase):
    def test_a_client_workdir_exports_its_trained_weights(self):
        from splitkeras.edge import EdgeSpec
        from splitkeras.export import export_from_workdir
        from tests.distributed.runs import setup as _setup
        from tests.distributed.runs import write_npz as _write_npz

        root = self.tempdir()
        config, _ = _setup(_write_npz(os.path.join(root, "data.npz"), 32))
        segments = builders.build_segments(config, builders.load_data(config))
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
        # A client's workdir has no trained server: none is exported.
        self.assertFalse(os.path.exists(os.path.join(out, "server_saved_model")))
        self.assertFalse(report["server"]["exported"])
        self.assertIn("no trained server segment", report["server"]["reason"])

    def test_the_command_line_exports_a_training_checkpoint(self):
        """`splitkeras export --workdir=W --out=O` on a `splitkeras train`
        run, with nothing else (the run's config.json, overrides included):
        the client with its optimizer state (iterations included) and the
        trained server, each with a serving_default signature."""
        from splitkeras import experiment
        from splitkeras.checkpointing import load_trained
        from tests.distributed.runs import setup as _setup
        from tests.distributed.runs import write_npz as _write_npz

        root = self.tempdir()
        data = _write_npz(os.path.join(root, "data.npz"), 64)
        config, _ = _setup(data, num_clients=1, **{"train.epochs": 1})
        workdir, out = os.path.join(root, "run"), os.path.join(root, "export")
        summary = experiment.train_and_evaluate(config, workdir)
        self.assertEqual(summary["steps"], 2)  # 64 examples / batch 32
        result = subprocess.run(
            [sys.executable, "-m", "splitkeras", "export"]
            + [f"--workdir={workdir}", f"--out={out}", "--quantize="],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("server_saved_model", result.stdout)
        with open(os.path.join(out, "export.json")) as f:
            report = json.load(f)
        self.assertIn("checkpoints/client_0/ckpt-2", report["restored_from"]["client"])
        self.assertIn("checkpoints/server/ckpt-2", report["restored_from"]["server"])

        # The checkpoint, read independently, is what LiteRT holds.
        data_arrays = builders.load_data(config)
        segments = builders.build_segments(config, data_arrays)
        optimizer = builders.make_optimizer(config)
        optimizer.build(segments.client.trainable_variables)
        load_trained(
            [segments.client], workdir, "client_0", "client.weights.h5", optimizer
        )
        load_trained([segments.server], workdir, "server", "server.weights.h5")
        self.assertEqual(int(optimizer.iterations.numpy()), 2)
        lite = LiteSegment(os.path.join(out, "client.tflite"))
        self.assertWeightsClose(
            lite.state(), _state(segments.client, optimizer), atol=0
        )
        # The server's SavedModel answers as the trained Keras server.
        x = data_arrays.x_test[:16].astype(np.float32) / np.float32(255.0)
        cut_tensor = segments.client(x, training=False)
        expected = segments.server(cut_tensor, training=False).numpy()
        served = tf.saved_model.load(os.path.join(out, "server_saved_model"))
        got = served.signatures["serve"](cut_0=cut_tensor)["output_0"].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        artifact = report["artifacts"]["server_saved_model"]
        self.assertLessEqual(artifact["max_abs_diff"], 1e-5)

        # saved_model_cli finds serving_default: the input and the output.
        for folder, expected in (
            ("saved_model", ["inputs['x']", "(-1, 28, 28, 1)", "outputs['cut_0']"]),
            ("server_saved_model", ["inputs['cut_0']", "outputs['output_0']"]),
        ):
            shown = subprocess.run(
                [
                    os.path.join(os.path.dirname(sys.executable), "saved_model_cli"),
                    "show",
                    f"--dir={os.path.join(out, folder)}",
                    "--tag_set=serve",
                    "--signature_def=serving_default",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(shown.returncode, 0, shown.stderr[-3000:])
            for text in expected:
                self.assertIn(text, shown.stdout)

    def test_an_untrained_imagenet_client_exports_without_loading_images(self):
        """A streamed dataset: shapes from its metadata, noise as the sample;
        no workdir: the seed's segment, and no server; mixed precision: a
        float32 build for inference."""
        from splitkeras.configs import imagenet_alexnet
        from splitkeras.edge import EdgeSpec
        from splitkeras.export import export_from_workdir
        from tests.data.test_data import _prepare_mock_metadata

        data_dir, out = self.tempdir(), self.tempdir()
        _prepare_mock_metadata(data_dir, "imagenet2012", {"train": 8, "validation": 4})
        config = imagenet_alexnet.get_config()
        config.data.path = data_dir
        config.data.image_size = 67  # AlexNet's smallest input, as above
        config.train.mixed_precision = "mixed_float16"  # as README runs it
        report = export_from_workdir(
            config, None, out, training=False, quantize=(), sample_size=3
        )
        self.assertEqual(report["sample_batch"], 3)
        self.assertEqual(report["input_shape"], [None, 67, 67, 3])
        self.assertEqual(report["restored_from"], {})
        self.assertFalse(report["server"]["exported"])
        self.assertEqual(report["mixed_precision"], "mixed_float16")
        self.assertLessEqual(report["artifacts"]["client.tflite"]["max_abs_diff"], 1e-4)
        # The float32 build the device runs = the run's float16 segment, up to
        # float16 rounding.
        segment = builders.build_segments(config, builders.load_data(config)).client
        self.assertEqual(segment.outputs[0].dtype, "float16")
        lite = LiteSegment(os.path.join(out, "client.tflite"))
        x = np.random.default_rng(0).uniform(size=(2, 67, 67, 3)).astype(np.float32)
        (got,) = lite.serve(x)
        self.assertEqual(got.dtype, np.float32)
        expected = segment(x, training=False).numpy().astype(np.float32)
        np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
        spec = EdgeSpec.read(os.path.join(out, "edge.json"))
        self.assertEqual((spec.data_name, spec.data_path), ("imagenet2012", data_dir))

    def test_a_workdir_without_weights_is_refused(self):
        from splitkeras.export import export_from_workdir
        from tests.distributed.runs import setup as _setup
        from tests.distributed.runs import write_npz as _write_npz

        root = self.tempdir()
        config, _ = _setup(_write_npz(os.path.join(root, "data.npz"), 32))
        with self.assertRaisesRegex(FileNotFoundError, "neither client.weights.h5"):
            export_from_workdir(config, root, os.path.join(root, "export"))

    def test_what_the_edge_cannot_run_is_refused_before_writing(self):
        from splitkeras.export import export_from_workdir
        from tests.distributed.runs import setup as _setup
        from tests.distributed.runs import write_npz as _write_npz

        root = self.tempdir()
        config, _ = _setup(_write_npz(os.path.join(root, "data.npz"), 32))
        out = os.path.join(root, "export")
        cases = (
            ("privacy", "nopeek_alpha", 1.0, {}, "edge client cannot take part"),
            ("train", "warmup_epochs", 1, {"training": True}, "one constant rate"),
        )
        for group, name, value, kwargs, message in cases:
            changed = config.copy_and_resolve_references()
            changed[group][name] = value
            with self.assertRaisesRegex(ValueError, message):
                export_from_workdir(changed, None, out, **kwargs)
            self.assertFalse(os.path.exists(out))
