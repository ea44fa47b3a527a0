"""Tests of splitkeras.cut and splitkeras.cut_points."""

import keras
import numpy as np

import splitkeras
from tests import base, tiny_models


def _x(shape=(2, 8, 8, 1), seed=0):
    return np.random.default_rng(seed).random(shape).astype("float32")


class CutTest(base.TestCase):
    def test_segments_compose_to_the_model(self):
        model = tiny_models.bn_dropout_model()
        segs = splitkeras.cut(model, "relu1")
        x = _x()
        np.testing.assert_array_equal(segs.server(segs.client(x)), model(x))
        self.assertIsNone(segs.tail)
        self.assertEqual(segs.cut_layers, ("relu1",))

    def test_segments_share_the_original_layer_objects(self):
        model = tiny_models.bn_dropout_model()
        segs = splitkeras.cut(model, "relu1")
        self.assertIs(segs.client.get_layer("conv1"), model.get_layer("conv1"))
        self.assertIs(segs.server.get_layer("logits"), model.get_layer("logits"))
        ids = lambda m: {id(v) for v in m.trainable_variables}  # noqa: E731
        self.assertEqual(ids(segs.client) | ids(segs.server), ids(model))
        self.assertEqual(ids(segs.client) & ids(segs.server), set())

    def test_skip_connection_across_the_cut_is_a_second_cut_tensor(self):
        model = tiny_models.skip_model()
        segs = splitkeras.cut(model, "relu_a")
        self.assertLen(segs.client.outputs, 2)
        self.assertLen(segs.server.inputs, 2)
        x = _x()
        a = segs.client(x)
        np.testing.assert_allclose(segs.server(a), model(x), atol=1e-6)
        # The skip tensor is stem_relu's output; the other is relu_a's.
        np.testing.assert_array_equal(
            a[0], keras.Model(model.inputs[0], model.get_layer("stem_relu").output)(x)
        )

    def test_ushaped_cut_gives_head_server_tail(self):
        model = tiny_models.bn_dropout_model()
        segs = splitkeras.cut(model, ["relu1", "fc1"])
        self.assertTrue(segs.ushaped)
        self.assertEqual(
            [layer.name for layer in segs.tail.layers[1:]], ["drop2", "logits"]
        )
        x = _x()
        np.testing.assert_array_equal(segs.tail(segs.server(segs.client(x))), model(x))

    def test_sequential_model(self):
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(4, name="a"),
                keras.layers.Dense(3, name="b"),
                keras.layers.Dense(2, name="c"),
            ]
        )
        self.assertEqual(splitkeras.cut_points(model), ["a", "b"])
        segs = splitkeras.cut(model, "b")
        x = _x((3, 6))
        np.testing.assert_array_equal(segs.server(segs.client(x)), model(x))

    def test_keras_applications_resnet50(self):
        model = keras.applications.ResNet50(
            weights=None, input_shape=(32, 32, 3), classes=5
        )
        points = splitkeras.cut_points(model)
        self.assertIn("pool1_pool", points)
        self.assertNotIn("predictions", points)
        # Inside a residual block the shortcut crosses the cut.
        segs = splitkeras.cut(model, "conv2_block2_1_relu")
        self.assertLen(segs.server.inputs, 2)
        x = _x((1, 32, 32, 3))
        np.testing.assert_allclose(
            segs.server(segs.client(x)), model(x), rtol=1e-5, atol=1e-5
        )

    def test_unknown_layer_lists_cut_points(self):
        model = tiny_models.skip_model()
        with self.assertRaisesRegex(
            ValueError,
            r"cut layer 'pool9' not found in model 'skip'; valid cut points are: "
            r"stem, stem_relu, conv_a, bn_a, relu_a, conv_b, add, block_out, gap, "
            r"fc1$",
        ):
            splitkeras.cut(model, "pool9")

    def test_cut_at_output_layer_is_refused(self):
        model = tiny_models.skip_model()
        with self.assertRaisesRegex(
            ValueError, r"cut layer 'logits' leaves nothing .*Valid cut points: stem"
        ):
            splitkeras.cut(model, "logits")

    def test_input_that_bypasses_the_cut_is_refused(self):
        a = keras.Input((4,), name="a")
        b = keras.Input((4,), name="b")
        h = keras.layers.Dense(3, name="ha")(a)
        h = keras.layers.Concatenate(name="cat")([h, b])
        model = keras.Model([a, b], keras.layers.Dense(2, name="out")(h), name="m")
        self.assertEqual(splitkeras.cut_points(model), ["cat"])
        with self.assertRaisesRegex(
            ValueError,
            r"cut at \['ha'\] does not separate model 'm': a tensor from a model "
            r"input bypasses the cut layer 'ha'.*Valid cut points: cat$",
        ):
            splitkeras.cut(model, "ha")

    def test_shared_layer_across_the_cut_is_refused(self):
        inp = keras.Input((4,))
        shared = keras.layers.Dense(4, name="shared")
        h = keras.layers.Dense(4, name="pre")(inp)
        h = shared(h)
        h = keras.layers.ReLU(name="mid")(h)
        h = shared(h)
        model = keras.Model(inp, keras.layers.Dense(2, name="out")(h), name="m")
        with self.assertRaisesRegex(
            ValueError,
            r"layer 'shared' of model 'm' is shared across the cut.*"
            r"Valid cut points: pre$",
        ):
            splitkeras.cut(model, "mid")
        with self.assertRaisesRegex(
            ValueError, r"'shared' is called 2 times.*Valid cut points: pre$"
        ):
            splitkeras.cut(model, "shared")
        self.assertEqual(splitkeras.cut_points(model), ["pre"])

    def test_ushaped_cut_layers_out_of_order_are_refused(self):
        model = tiny_models.bn_dropout_model()
        with self.assertRaisesRegex(ValueError, r"not in graph order"):
            splitkeras.cut(model, ["fc1", "relu1"])

    def test_unbuilt_model_is_refused(self):
        model = keras.Sequential([keras.layers.Dense(2, name="d")])
        with self.assertRaisesRegex(ValueError, r"has no symbolic inputs"):
            splitkeras.cut(model, "d")
