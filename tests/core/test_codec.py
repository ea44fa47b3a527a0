"""Wire codecs: what they keep, what they cost, and that they compile."""

import math

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import splitkeras
from splitkeras.configs import base as base_config
from splitkeras.protocol import Kind, Message
from splitkeras.transport import codec as codec_lib
from splitkeras.transport.local import LocalTransport
from tests import base, tiny_models

ALL = ["float32", "float16", "bfloat16", "int8", "int8_channel", "topk", "topk:0.3"]


def _x(shape=(8, 5, 5, 3), seed=0):
    """Normal values with a different spread per channel (last axis)."""
    rng = np.random.default_rng(seed)
    spread = np.geomspace(0.01, 10.0, shape[-1]).astype("float32")
    return (rng.standard_normal(shape).astype("float32") * spread).astype("float32")


def _round_trip(name, x):
    codec = codec_lib.get_codec(name)
    x = tf.convert_to_tensor(x)
    parts = codec.encode(x)
    return parts, codec.decode(parts, x.dtype, tf.shape(x)).numpy()


class Int8Test(base.TestCase):
    def test_error_is_at_most_half_a_step(self):
        x = _x()
        (q, scale), y = _round_trip("int8", x)
        self.assertEqual(q.dtype, tf.int8)
        self.assertEqual(scale.shape, [])
        np.testing.assert_allclose(scale, np.abs(x).max() / 127, rtol=1e-6)
        self.assertEqual(np.abs(q.numpy()).max(), 127)
        err = np.abs(y - x)
        self.assertTrue(np.all(err <= scale.numpy() / 2 * (1 + 1e-5)), err.max())

    def test_per_channel_scales_and_error(self):
        x = _x()
        (q, scale), y = _round_trip("int8_channel", x)
        self.assertEqual(q.shape, x.shape)
        self.assertEqual(scale.shape, [x.shape[-1]])
        np.testing.assert_allclose(
            scale, np.abs(x).max(axis=(0, 1, 2)) / 127, rtol=1e-6
        )
        err = np.abs(y - x)
        self.assertTrue(np.all(err <= scale.numpy() / 2 * (1 + 1e-5)))
        # A small channel keeps its precision: far better than one scale.
        _, y_tensor = _round_trip("int8", x)
        self.assertLess(np.abs(y - x)[..., 0].max(), np.abs(y_tensor - x)[..., 0].max())

    @parameterized.parameters("int8", "int8_channel")
    def test_zeros_are_exact(self, name):
        x = _x()
        x[..., 1] = 0.0  # an all-zero channel
        x[0] = 0.0
        _, y = _round_trip(name, x)
        self.assertTrue(np.all(y[x == 0] == 0))
        parts, y = _round_trip(name, np.zeros((2, 3, 4), "float32"))
        np.testing.assert_array_equal(y, 0.0)
        self.assertTrue(np.all(np.isfinite(parts[1].numpy())))


class TopKTest(base.TestCase):
    @parameterized.parameters(0.1, 0.25, 0.5, 1e-4)
    def test_keeps_exactly_the_k_largest_magnitudes(self, fraction):
        shape = (4, 6, 5)
        size = int(np.prod(shape))
        rng = np.random.default_rng(1)
        # distinct magnitudes, random signs and places
        x = (rng.permutation(size) + 1.0) * rng.choice([-1.0, 1.0], size)
        x = x.reshape(shape).astype("float32")
        (values, indices), y = _round_trip(f"topk:{fraction}", x)
        k = max(1, math.ceil(fraction * size))
        self.assertEqual(values.shape, [k])
        self.assertEqual((values.dtype, indices.dtype), (tf.float32, tf.int32))
        kept = np.abs(x) > size - k  # the k largest |x| are size-k+1 .. size
        np.testing.assert_array_equal(y[kept], x[kept])
        np.testing.assert_array_equal(y[~kept], 0.0)

    def test_fraction_one_is_lossless_and_bare_topk_keeps_a_tenth(self):
        x = _x()
        _, y = _round_trip("topk:1", x)
        np.testing.assert_array_equal(y, x)
        self.assertEqual(codec_lib.get_codec("topk").name, "topk:0.1")
        (values, _), _ = _round_trip("topk", x)
        self.assertEqual(values.shape, [math.ceil(0.1 * x.size)])

    def test_decodes_to_a_static_shape_and_refuses_a_partial_one(self):
        codec = codec_lib.get_codec("topk")
        x = tf.constant(_x())
        parts = codec.encode(x)
        np.testing.assert_array_equal(
            codec.decode(parts, tf.float32, x.shape),
            codec.decode(parts, tf.float32, tf.shape(x)),
        )
        with self.assertRaisesRegex(ValueError, "decodes to a full shape"):
            codec.decode(parts, tf.float32, tf.TensorShape([None, 5, 5, 3]))


class CodecTest(base.TestCase):
    @parameterized.parameters(*ALL)
    def test_non_float_tensors_pass_unchanged(self, name):
        codec = codec_lib.get_codec(name)
        labels = tf.constant([3, 1, 4, 1, 5], tf.int64)
        parts = codec.encode(labels)
        self.assertLen(parts, 1)
        self.assertEqual(codec.wire_dtypes(tf.int64), (tf.int64,))
        np.testing.assert_array_equal(
            codec.decode(parts, tf.int64, tf.shape(labels)), labels
        )

    @parameterized.product(name=ALL, dtype=["float32", "float16", "bfloat16"])
    def test_wire_dtypes_are_those_encode_makes(self, name, dtype):
        codec = codec_lib.get_codec(name)
        x = tf.cast(_x(), dtype)
        parts = codec.encode(x)
        self.assertEqual(tuple(p.dtype for p in parts), codec.wire_dtypes(x.dtype))
        self.assertEqual(codec.decode(parts, x.dtype, tf.shape(x)).dtype, x.dtype)

    @parameterized.parameters(*ALL)
    def test_compiles_with_a_dynamic_batch(self, name):
        codec = codec_lib.get_codec(name)

        @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 3], tf.float32)])
        def trip(x):
            return codec.decode(codec.encode(x), x.dtype, tf.shape(x))

        for batch in (2, 7):
            x = _x((batch, 5, 5, 3), seed=batch)
            _, eager = _round_trip(name, x)
            np.testing.assert_array_equal(trip(x), eager)

    def test_unknown_codec_is_refused(self):
        with self.assertRaisesWithLiteralMatch(
            ValueError,
            "unknown codec 'int4'; available codecs: float32, float16, bfloat16, "
            "int8, int8_channel, topk, topk:<fraction in (0, 1]>",
        ):
            codec_lib.get_codec("int4")

    @parameterized.parameters("0", "1.5", "-0.1", "nan", "ten")
    def test_bad_topk_fraction_is_refused(self, fraction):
        with self.assertRaisesWithLiteralMatch(
            ValueError,
            f"top-k keep fraction must be a number in (0, 1], got {fraction!r} "
            "(e.g. 'topk:0.1' keeps the 10% largest |x|)",
        ):
            codec_lib.get_codec(f"topk:{fraction}")

    def test_pairs(self):
        self.assertEqual(codec_lib.as_pair("int8"), ("int8", "int8"))
        self.assertEqual(codec_lib.as_pair(["int8", "float32"]), ("int8", "float32"))
        with self.assertRaisesRegex(ValueError, "one name or an \\(up, down\\) pair"):
            codec_lib.as_pair(("int8", "float32", "float16"))

    def test_codec_pair_reads_the_config(self):
        c = base_config.get_config()
        self.assertEqual(codec_lib.codec_pair(c), ("float32", "float32"))
        c.transport.codec = "float16"
        self.assertEqual(codec_lib.codec_pair(c), ("float16", "float16"))
        c.transport.activation_codec = "topk:0.2"
        self.assertEqual(codec_lib.codec_pair(c), ("topk:0.2", "float16"))
        c.transport.gradient_codec = "int8"
        self.assertEqual(codec_lib.codec_pair(c), ("topk:0.2", "int8"))
        c.transport.activation_codec = "topk"  # canonical names
        self.assertEqual(codec_lib.codec_pair(c), ("topk:0.1", "int8"))
        c.transport.gradient_codec = "int4"
        with self.assertRaisesRegex(ValueError, "unknown codec 'int4'"):
            codec_lib.codec_pair(c)


class WireBytesTest(base.TestCase):
    def _bytes(self, up, down, tensor, labels=None):
        transport = LocalTransport(None, 1, up, down)
        message = Message(Kind.TRAIN, 0, 0, tensors=(tensor,), labels=labels)
        transport.carry_up(message)
        transport.carry_down(message.replace(kind=Kind.GRADIENTS, labels=None))
        counts = transport.byte_counts()
        return counts["bytes_up"][0], counts["bytes_down"][0]

    def test_int8_is_a_quarter_of_float32(self):
        x = tf.constant(_x((64, 14, 14, 6)))
        size = 64 * 14 * 14 * 6
        f32_up, f32_down = self._bytes("float32", "float32", x)
        self.assertEqual((f32_up, f32_down), (4 * size, 4 * size))
        int8_up, f32_down = self._bytes("int8", "float32", x)
        self.assertEqual((int8_up, f32_down), (size + 4, 4 * size))
        self.assertLessEqual(int8_up / f32_up, 0.26)
        self.assertEqual(self._bytes("int8_channel", "int8", x), (size + 24, size + 4))

    def test_topk_and_labels(self):
        x = tf.constant(_x((64, 14, 14, 6)))
        k = math.ceil(0.1 * 64 * 14 * 14 * 6)
        labels = tf.zeros([64], tf.int64)
        up, down = self._bytes("topk", "topk:0.5", x, labels)
        self.assertEqual(up, 8 * k + 8 * 64)  # float32 values + int32 indices
        self.assertEqual(down, 8 * math.ceil(0.5 * 64 * 14 * 14 * 6))


class SplitModelTest(base.TestCase):
    @parameterized.parameters(
        # up codec, down codec, wire bytes up per step (cut: 8 x 8x8x4 float32)
        ("int8", "float32", 8 * 8 * 8 * 4 + 4),
        ("topk:0.5", "int8_channel", 8 * (8 * 8 * 8 * 4) // 2),
    )
    def test_trains_with_compressed_wire(self, up, down, wire_up):
        rng = np.random.default_rng(0)
        x = rng.random((48, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 3, 48)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model = tiny_models.bn_dropout_model()
        conv1 = model.get_layer("conv1").kernel.numpy()
        logits = model.get_layer("logits").kernel.numpy()
        split = splitkeras.SplitModel(model, "relu1", codec=(up, down))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        split.compile("adam", "adam", loss=loss)
        history = split.fit(ds, epochs=2, verbose=0)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))
        # Both parties learned: the client's first conv and the server's logits.
        self.assertGreater(np.abs(model.get_layer("conv1").kernel - conv1).max(), 0)
        self.assertGreater(np.abs(model.get_layer("logits").kernel - logits).max(), 0)
        self.assertEqual(split.byte_counts()["bytes_up"], 12 * (wire_up + 8 * 8))
