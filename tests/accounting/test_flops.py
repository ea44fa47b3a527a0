"""FLOPs counted from layers, cross-checked with TensorFlow's profiler."""

import keras
import tensorflow as tf
from absl.testing import parameterized
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

import splitkeras
from splitkeras import models
from splitkeras.accounting.flops import count_flops, training_flops
from tests import base


def _profiler_flops(model) -> int:
    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(
        tf.TensorSpec([1, *model.inputs[0].shape[1:]])
    )
    graph = convert_variables_to_constants_v2(concrete).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


class FlopsTest(base.TestCase):
    @parameterized.named_parameters(
        ("lenet5", lambda: models.lenet5()),
        ("vgg11_small", lambda: models.vgg(depth=11, width=0.25)),
    )
    def test_agrees_with_the_tensorflow_profiler(self, build):
        model = build()
        ours = count_flops(model).forward
        # The profiler skips activations and pooling comparisons, which we
        # count (1 per element); measured: 0.992 (LeNet-5), 0.995 (VGG-11).
        self.assertAlmostEqual(_profiler_flops(model) / ours, 1.0, delta=0.02)

    def test_segments_add_up_to_the_model(self):
        model = models.vgg(depth=11, width=0.25)
        segments = splitkeras.cut(model, "block2_relu1")
        parts = [count_flops(s) for s in segments]
        whole = count_flops(model)
        self.assertEqual(sum(p.forward for p in parts), whole.forward)
        self.assertEqual(sum(p.backward for p in parts), whole.backward)

    def test_vgg16_first_convolution_and_client_segment(self):
        model = models.vgg(depth=16)
        client = splitkeras.cut(model, "block1_relu1").client
        by_name = {layer.name: layer for layer in count_flops(client).layers}
        # 32x32 outputs x 64 filters x 3x3x3 multiply-adds, no bias (BN follows).
        self.assertEqual(by_name["block1_conv1"].forward, 2 * 32 * 32 * 64 * 27)
        self.assertEqual(by_name["block1_bn1"].forward, 4 * 32 * 32 * 64)
        self.assertEqual(by_name["block1_relu1"].backward, 32 * 32 * 64)
        # The whole VGG-16: about 314.5 M multiply-adds forward.
        self.assertAlmostEqual(count_flops(model).forward / 2e6, 314.5, delta=0.5)

    def test_unknown_layers_are_listed(self):
        inputs = keras.Input((5, 3))
        hidden = keras.layers.LSTM(4, name="memory")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))
        report = count_flops(model)
        self.assertEqual(report.not_counted, ("memory (LSTM)",))
        self.assertEqual(report.forward, 2 * 4 * 2 + 2)

    def test_resnet50_is_fully_counted(self):
        model = keras.applications.ResNet50(
            weights=None, input_shape=(32, 32, 3), classes=100
        )
        report = count_flops(model)
        self.assertEqual(report.not_counted, ())
        self.assertEqual(training_flops(model, 10, 2), 20 * report.training)
