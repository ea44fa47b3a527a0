"""The edge client's pieces that need no server: numpy codecs equal the
TensorFlow codecs byte for byte; the package imports without TensorFlow;
edge.json round-trips."""

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.edge import EdgeSpec, codecs
from splitkeras.models.registry import build_model
from splitkeras.transport.codec import get_codec
from tests import base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EdgeCodecTest(base.TestCase):
    @parameterized.parameters(*codecs.CODECS)
    def test_numpy_codec_equals_tensorflow_codec(self, name):
        rng = np.random.default_rng(0)
        arrays = [
            (rng.normal(size=(4, 5, 3)) * 3).astype(np.float32),
            np.zeros((2, 3), np.float32),
            # Halves: values that round to even in x / scale.
            (np.round(rng.normal(size=(8, 6)) * 2) / 2).astype(np.float32),
            np.zeros((0, 4), np.float32),
        ]
        codec = get_codec(name)
        for x in arrays:
            got = codecs.encode(name, x)
            want = [p.numpy() for p in codec.encode(tf.constant(x))]
            self.assertEqual(len(got), len(want))
            for g, w in zip(got, want):
                self.assertEqual(g.dtype, w.dtype)
                self.assertEqual(g.shape, w.shape)
                self.assertEqual(g.tobytes(), w.tobytes())
            self.assertEqual(
                [list(p.shape) for p in got], codecs.part_shapes(name, x.dtype, x.shape)
            )
            parts = tuple(tf.constant(p) for p in want)
            decoded = codec.decode(parts, tf.float32, x.shape)
            np.testing.assert_array_equal(
                codecs.decode(name, got, np.float32), decoded.numpy()
            )

    def test_labels_pass_unchanged(self):
        y = np.array([3, 1, 2], np.int64)
        (part,) = codecs.encode("int8", y)
        np.testing.assert_array_equal(part, y)

    def test_topk_is_refused_by_name(self):
        with self.assertRaisesRegex(ValueError, "codec 'topk:0.1' is not available"):
            codecs.encode("topk:0.1", np.zeros(3, np.float32))


class ImportTest(base.TestCase):
    def test_edge_modules_import_without_tensorflow(self):
        code = (
            "import sys, splitkeras, splitkeras.edge, splitkeras.data\n"
            "from splitkeras.transport import wire, grpc_client, sealing, tls\n"
            "from splitkeras.data import load, partition\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
            "assert 'keras' not in sys.modules, 'keras was imported'\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_public_names_load_on_use(self):
        import splitkeras
        import splitkeras.cut  # the submodule must not shadow the function

        self.assertTrue(callable(splitkeras.cut))
        self.assertIs(splitkeras.cut, splitkeras.cut.__globals__["cut"])
        for name in splitkeras.__all__:
            self.assertIsNotNone(getattr(splitkeras, name), name)
        with self.assertRaisesRegex(AttributeError, "has no attribute 'nope'"):
            splitkeras.nope  # noqa: B018


class EdgeSpecTest(base.TestCase):
    def test_round_trip_from_config(self):
        config = fashion_mnist_lenet.get_config()
        config.num_clients = 3
        config.transport.activation_codec = "int8"
        config.data.path = None  # TFDS's default directory
        model = build_model("lenet5", input_shape=(28, 28, 1), num_classes=10)
        spec = EdgeSpec.from_config(config, cut(model, "pool1"), client_id=2)
        path = os.path.join(self.tempdir(), "edge.json")
        spec.write(path)
        read = EdgeSpec.read(path)
        self.assertEqual(read, spec)
        self.assertEqual(read.cut_shapes, [[14, 14, 6]])
        self.assertEqual((read.codec_up, read.codec_down), ("int8", "float32"))
        self.assertEqual((read.num_clients, read.client_id), (3, 2))
        self.assertEqual(read.input_shape, [28, 28, 1])
        # The run's gRPC limits, not the edge client's own.
        self.assertEqual(
            (read.max_message_mb, read.timeout_seconds, read.retry_seconds),
            (
                config.grpc.max_message_mb,
                config.grpc.timeout_seconds,
                config.grpc.retry_seconds,
            ),
        )
        self.assertIsNone(read.data_path)  # the config reads TFDS's default

    def test_privacy_defenses_are_refused(self):
        config = fashion_mnist_lenet.get_config()
        config.privacy.nopeek_alpha = 1.0
        model = build_model("lenet5", input_shape=(28, 28, 1), num_classes=10)
        with self.assertRaisesRegex(ValueError, "edge client cannot take part"):
            EdgeSpec.from_config(config, cut(model, "pool1"))

    def test_unknown_format_is_refused(self):
        path = os.path.join(self.tempdir(), "edge.json")
        with open(path, "w") as f:
            f.write('{"format": 99}')
        with self.assertRaisesRegex(ValueError, "edge spec format 99"):
            EdgeSpec.read(path)

    def test_the_edge_reads_only_local_files(self):
        """A run on TFDS (no path, or a TFDS data_dir): the edge asks for
        --data, since it has no TFDS; an IDX folder or .npz file is read."""
        from splitkeras.edge.client import load_client_data
        from tests.distributed.runs import write_npz as _write_npz

        spec = EdgeSpec([28, 28, 1], [[14, 14, 6]], 64, 120.0, 300.0)
        with self.assertRaisesRegex(ValueError, "names no data path.*--data"):
            load_client_data(spec)
        spec.data_path = self.tempdir()  # e.g. a TFDS data_dir
        with self.assertRaisesRegex(ValueError, "neither a .npz file nor.*--data"):
            load_client_data(spec)
        with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
            load_client_data(spec, os.path.join(spec.data_path, "missing.npz"))
        npz = _write_npz(os.path.join(self.tempdir(), "data.npz"), 12, 5)
        (x, y), (x_test, _) = load_client_data(spec, npz)
        self.assertEqual(
            (x.shape, y.shape, x_test.shape), ((12, 28, 28, 1), (12,), (5, 28, 28, 1))
        )
