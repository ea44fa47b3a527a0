"""FLOPs counted from layers: by hand, against TF's profiler, across cuts."""

import math

import keras
import tensorflow as tf
from absl.testing import parameterized
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

import splitkeras
from splitkeras import models
from splitkeras.accounting import count_flops, training_flops
from splitkeras.models.vgg import VGG_CONFIGS
from tests import base

L = keras.layers


def _profiler_flops(model) -> int:
    """TensorFlow's count for the frozen forward graph of one example."""
    forward = tf.function(lambda x: model(x, training=False))
    concrete = forward.get_concrete_function(
        tf.TensorSpec([1, *model.inputs[0].shape[1:]])
    )
    graph = convert_variables_to_constants_v2(concrete).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def _profiler_differences(model, report) -> int:
    """What we count and the profiler does not (see the flops docstring).

    The profiler has no statistic for Relu (we count 1 per element) and sees
    batch normalization folded (2 per element + 6 per channel; we count 4).
    """
    extra = 0
    for entry in report.layers:
        layer = model.get_layer(entry.name)
        out = math.prod(layer.output.shape[1:])
        if isinstance(layer, L.ReLU):
            extra += entry.forward
        elif getattr(getattr(layer, "activation", None), "__name__", "") == "relu":
            extra += out
        elif isinstance(layer, L.BatchNormalization):
            extra += 2 * out - 6 * layer.output.shape[-1]
    return extra


def _other_layers():
    """Layers the zoo does not use, each formula checked by the profiler."""
    x = inputs = keras.Input((16, 16, 3))
    x = L.Rescaling(1 / 255.0, offset=-0.5, name="rescale")(x)
    x = L.Conv2D(8, 3, padding="same", name="conv")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = L.SeparableConv2D(8, 3, strides=2, name="sep")(x)
    y = L.Conv2DTranspose(8, 3, strides=2, padding="same", name="tconv")(x)
    y = L.AveragePooling2D(2, name="avg")(y)
    x = L.Add(name="add")([x, y])
    x = L.Average(name="average")([x, L.Multiply(name="mul")([x, x]), x])
    x = L.Conv1D(4, 3, name="conv1d")(L.Reshape((-1, 8), name="reshape")(x))
    x = L.GlobalAveragePooling1D(name="gap")(x)
    outputs = L.Dense(5, activation="softmax", name="fc")(x)
    return keras.Model(inputs, outputs)


class FlopsTest(base.TestCase):
    def test_lenet5_by_hand(self):
        report = count_flops(models.lenet5())
        # Convs and Dense: 2 per multiply-add, + bias + ReLU per output.
        expected = {
            "conv1": 2 * 28 * 28 * 6 * 25 + 2 * 28 * 28 * 6,
            "pool1": 14 * 14 * 6 * 4,
            "conv2": 2 * 10 * 10 * 16 * 150 + 2 * 10 * 10 * 16,
            "pool2": 5 * 5 * 16 * 4,
            "flatten": 0,
            "fc1": 2 * 400 * 120 + 2 * 120,
            "fc2": 2 * 120 * 84 + 2 * 84,
            "logits": 2 * 84 * 10 + 10,
        }
        self.assertEqual({e.name: e.forward for e in report.layers}, expected)
        self.assertEqual(report.forward, 852_370)
        self.assertEqual(report.backward, 2 * 852_370 - 4704 - 1600)  # pools: 1x
        self.assertEqual(report.not_counted, ())

    @parameterized.named_parameters(
        ("lenet5", models.lenet5, 845_862, 852_370),
        ("vgg11_quarter", lambda: models.vgg(11, width=0.25), 20_536_874, 20_647_434),
        ("other_layers", _other_layers, 290_062, 290_062),
    )
    def test_agrees_with_the_tensorflow_profiler(self, build, profiler, ours):
        model = build()
        report = count_flops(model)
        self.assertEqual(report.not_counted, ())
        self.assertEqual(report.forward, ours)
        self.assertEqual(_profiler_flops(model), profiler)
        # Exactly equal once ReLU and batch norm are counted the profiler's way;
        # overall within 1% (0.992 for LeNet-5, 0.995 for the VGG).
        self.assertEqual(profiler, ours - _profiler_differences(model, report))
        self.assertAlmostEqual(profiler / ours, 1.0, delta=0.01)

    @parameterized.parameters(["pool1"], [("pool1", "fc2")])
    def test_segments_add_up_to_the_model(self, at):
        model = models.lenet5()
        segments = list(splitkeras.cut(model, at))
        whole = count_flops(model)
        parts = [count_flops(s) for s in segments]
        self.assertEqual(sum(p.forward for p in parts), whole.forward)
        self.assertEqual(sum(p.backward for p in parts), whole.backward)
        # Fed raw data, the client skips conv1's input gradient, as does the
        # whole model.
        raw = count_flops(segments[0], input_gradient=False)
        self.assertEqual(
            raw.backward + sum(p.backward for p in parts[1:]),
            count_flops(model, input_gradient=False).backward,
        )
        self.assertEqual(parts[0].backward - raw.backward, 2 * 28 * 28 * 6 * 26)

    def test_vgg16_first_convolution_and_client_segment(self):
        model = models.vgg(depth=16)
        client = splitkeras.cut(model, "block1_relu1").client
        report = count_flops(client)
        conv, bn, relu = report.layers
        # 32x32 outputs x 64 filters x 3x3x3 multiply-adds; no bias (BN follows).
        self.assertEqual(conv.forward, 2 * 32 * 32 * 64 * (3 * 3 * 3))
        self.assertEqual((bn.forward, relu.forward), (4 * 65536, 65536))
        self.assertEqual(report.forward, 3_866_624)
        self.assertEqual(report.backward, 2 * 3_538_944 + 2 * 4 * 65536 + 65536)
        raw = count_flops(client, input_gradient=False)
        self.assertEqual(raw.backward, report.backward - 3_538_944)
        # The whole model's conv multiply-adds, from the configuration.
        side, c_in, conv_macs = 32, 3, 0
        for block in VGG_CONFIGS[16]:
            for c_out in block:
                conv_macs += side * side * c_out * 9 * c_in
                c_in = c_out
            side //= 2
        whole = count_flops(model)
        convs = sum(e.forward for e in whole.layers if e.kind == "Conv2D")
        self.assertEqual(convs, 2 * conv_macs)
        self.assertEqual(conv_macs, 313_196_544)
        self.assertEqual(whole.forward, 628_961_290)

    def test_unknown_layers_are_listed(self):
        class Scale(L.Layer):
            def build(self, input_shape):
                self.scale = self.add_weight(shape=(), initializer="ones")

            def call(self, x):
                return x * self.scale

        class Double(L.Layer):
            def call(self, x):
                return 2 * x

        inputs = keras.Input((5, 3))
        x = L.LSTM(4, name="memory")(inputs)
        x = Double(name="double")(Scale(name="scale")(x))
        model = keras.Model(inputs, L.Dense(2, name="out")(x))
        report = count_flops(model)
        self.assertEqual(
            report.not_counted,
            ("memory (LSTM)", "scale (Scale)", "double (Double)"),
        )
        self.assertEqual(report.forward, 2 * 4 * 2 + 2)

    def test_resnet50_is_fully_counted(self):
        model = keras.applications.ResNet50(
            weights=None, input_shape=(32, 32, 3), classes=10
        )
        report = count_flops(model)
        self.assertEqual(report.not_counted, ())
        first = next(e for e in report.layers if e.name == "conv1_conv")
        # 7x7/2 on the 38x38 padded input: 16x16x64 outputs, + bias.
        self.assertEqual(first.forward, 2 * 16 * 16 * 64 * 147 + 16 * 16 * 64)
        self.assertEqual(report.forward, 158_842_940)
        self.assertEqual(training_flops(model, 10, epochs=2), 20 * report.training)

    def test_nested_models_are_counted_layer_by_layer(self):
        inner = keras.Sequential(
            [keras.Input((8,)), L.Dense(4, name="hidden"), L.ReLU(name="relu")],
            name="body",
        )
        inputs = keras.Input((8,))
        model = keras.Model(inputs, L.Dense(2, name="head")(inner(inputs)))
        report = count_flops(model)
        self.assertEqual(
            [(e.name, e.forward) for e in report.layers],
            [("body/hidden", 68), ("body/relu", 4), ("head", 18)],
        )

    def test_errors_say_what_is_missing(self):
        inputs = keras.Input((None, None, 3))
        model = keras.Model(inputs, L.Conv2D(2, 3, name="conv")(inputs))
        with self.assertRaisesRegex(ValueError, "layer 'conv'.*fixed input_shape"):
            count_flops(model)
        with self.assertRaisesRegex(ValueError, "no symbolic inputs"):
            count_flops(keras.Sequential([L.Dense(2)]))
        with self.assertRaisesRegex(ValueError, "examples=-1"):
            training_flops(models.lenet5(), -1)
