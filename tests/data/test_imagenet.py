"""Tests for splitkeras.data.imagenet: the streaming ImageNet pipelines.

Two sources of data: `tfds.testing.mock_data` (random JPEGs of random sizes,
but it serves the same examples for every split and ignores the read
configuration), and a real imagenet2012 prepared by TFDS from tiny fake
ILSVRC-2012 tar files, for what depends on TFDS reading the split (shards,
file order).
"""

import dataclasses
import glob
import io
import os
import shutil
import tarfile
import tempfile
import time
from unittest import mock

import numpy as np
import tensorflow as tf

from splitkeras.data import imagenet
from splitkeras.data import imagenet_preprocess as prep
from splitkeras.data.streaming import StreamingSource
from tests import base
from tests.data.test_data import _mock_tfds, _prepare_mock_metadata

MEAN = np.array(prep.MEAN)
STD = np.array(prep.STD)

# tests/base.py sets TMPDIR after `tempfile` has cached /tmp as its default:
# forget it, so that the files autograph and TFDS write go under TMPDIR.
_FORGET_CACHED_TEMPDIR = mock.patch.object(tempfile, "tempdir", None)


def setUpModule():
    _FORGET_CACHED_TEMPDIR.start()


def tearDownModule():
    _FORGET_CACHED_TEMPDIR.stop()


def _jpeg(pixels: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(pixels, quality=90).numpy()


def _constant_jpeg(colour, height=40, width=60) -> bytes:
    return _jpeg(np.full((height, width, 3), colour, np.uint8))


def _noise_jpeg(rng, height, width) -> bytes:
    return _jpeg(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def _labels(dataset):
    return np.concatenate([y.numpy() for _, y in dataset])


def _add_to_tar(tar, name, content):
    entry = tarfile.TarInfo(name)
    entry.size = len(content)
    tar.addfile(entry, io.BytesIO(content))


def _write_fake_ilsvrc2012(manual_dir, synsets, num_validation, rng):
    """Writes the two ILSVRC-2012 tar files, one training image per class."""
    os.makedirs(manual_dir)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as t:
        for synset in synsets:
            class_tar = io.BytesIO()
            with tarfile.open(fileobj=class_tar, mode="w") as inner:
                jpeg = _noise_jpeg(rng, *rng.integers(20, 60, 2))
                _add_to_tar(inner, f"{synset}_1.JPEG", jpeg)
            _add_to_tar(t, f"{synset}.tar", class_tar.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as t:
        for i in range(1, num_validation + 1):
            jpeg = _noise_jpeg(rng, *rng.integers(20, 60, 2))
            _add_to_tar(t, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg)


class PreprocessTest(base.TestCase):
    def test_constant_colour_is_normalized_per_channel(self):
        colour = (200, 90, 30)
        image_bytes = _constant_jpeg(colour)
        # JPEG shifts a constant colour by a few levels (chroma quantization):
        # compare with what the decoder gives.
        decoded = tf.io.decode_jpeg(image_bytes).numpy()
        self.assertEqual(decoded.min(axis=(0, 1)).tolist(), decoded[0, 0].tolist())
        self.assertEqual(decoded.max(axis=(0, 1)).tolist(), decoded[0, 0].tolist())
        np.testing.assert_allclose(decoded[0, 0], colour, atol=4)
        expected = (decoded[0, 0] / 255 - MEAN) / STD
        outputs = {
            "eval": prep.preprocess_eval(image_bytes, image_size=16),
            "train": prep.preprocess_train(image_bytes, [1, 2], image_size=16),
        }
        for kind, image in outputs.items():
            self.assertEqual(image.shape, (16, 16, 3), kind)
            self.assertEqual(image.dtype, tf.float32, kind)
            np.testing.assert_allclose(
                image.numpy(), np.broadcast_to(expected, (16, 16, 3)), atol=1e-5
            )

    def test_eval_keeps_the_centre_square(self):
        # 100 x 300: the crop keeps 64 / 96 of the shorter side, columns
        # 117 to 183, all inside the grey middle third.
        pixels = np.zeros((100, 300, 3), np.uint8)
        pixels[:, 100:200] = 128
        image = prep.preprocess_eval(_jpeg(pixels), image_size=64).numpy()
        grey = (128 / 255 - MEAN) / STD
        np.testing.assert_allclose(image, np.broadcast_to(grey, image.shape), atol=0.03)

    def test_train_falls_back_to_the_centre_crop(self):
        # 16 x 800: a crop of >= 8% of the area with an aspect ratio of at
        # most 4/3 does not fit, so every attempt misses.
        image_bytes = _noise_jpeg(np.random.default_rng(1), 16, 800)
        centre = prep.preprocess_eval(image_bytes, image_size=32).numpy()
        for i in range(4):
            image = prep.preprocess_train(image_bytes, [0, i], image_size=32)
            image = image.numpy()
            flipped = image[:, ::-1]
            self.assertTrue(
                np.allclose(image, centre, atol=1e-6)
                or np.allclose(flipped, centre, atol=1e-6),
                f"seed [0, {i}]",
            )

    def test_train_output_is_a_function_of_the_seed(self):
        image_bytes = _noise_jpeg(np.random.default_rng(0), 120, 90)

        def crop(seed):
            return prep.preprocess_train(image_bytes, seed, image_size=32).numpy()

        np.testing.assert_array_equal(crop([3, 4]), crop([3, 4]))
        distinct = {crop([3, i]).tobytes() for i in range(5)}
        self.assertEqual(len(distinct), 5)


class MockedPipelineTest(base.TestCase):
    """imagenet2012 as served by mock_data: 10 random JPEGs of 5-50 pixels."""

    def setUp(self):
        super().setUp()
        self.data_dir = self.tempdir()
        _prepare_mock_metadata(
            self.data_dir, "imagenet2012", {"train": 10, "validation": 10}
        )

    def test_info(self):
        with _mock_tfds(self.data_dir, num_examples=10):
            num_classes, splits = imagenet.info(data_dir=self.data_dir)
        self.assertEqual(num_classes, 1000)
        self.assertEqual(splits, {"train": 10, "validation": 10})

    def test_train_shapes_and_dtypes(self):
        with _mock_tfds(self.data_dir, num_examples=10):
            batches = _batches(
                imagenet.train_dataset(4, data_dir=self.data_dir, image_size=64)
            )
        self.assertLen(batches, 2)  # The last 2 examples are dropped.
        for images, labels in batches:
            self.assertEqual(images.shape, (4, 64, 64, 3))
            self.assertEqual(images.dtype, np.float32)
            self.assertEqual(labels.shape, (4,))
            self.assertEqual(labels.dtype, np.int64)
            self.assertTrue(np.all((labels >= 0) & (labels < 1000)))
            # Normalized values of [0, 255] pixels.
            self.assertTrue(np.all(images >= ((0 - MEAN) / STD).min() - 1e-5))
            self.assertTrue(np.all(images <= ((1 - MEAN) / STD).max() + 1e-5))

    def test_eval_shapes_last_partial_batch_and_determinism(self):
        with _mock_tfds(self.data_dir, num_examples=10):
            dataset = imagenet.eval_dataset(4, data_dir=self.data_dir, image_size=64)
            first = _batches(dataset)
            second = _batches(dataset)
            rebuilt = _batches(
                imagenet.eval_dataset(4, data_dir=self.data_dir, image_size=64)
            )
        self.assertEqual([len(y) for _, y in first], [4, 4, 2])
        for images, labels in first:
            self.assertEqual(images.shape[1:], (64, 64, 3))
            self.assertEqual(images.dtype, np.float32)
            self.assertEqual(labels.dtype, np.int64)
        for other in (second, rebuilt):
            for (x1, y1), (x2, y2) in zip(first, other, strict=True):
                np.testing.assert_array_equal(x1, x2)
                np.testing.assert_array_equal(y1, y2)

    def test_train_is_reproducible_per_seed_and_epoch(self):
        def epoch(seed, number):
            return _batches(
                imagenet.train_dataset(
                    5, data_dir=self.data_dir, image_size=32, seed=seed, epoch=number
                )
            )

        with _mock_tfds(self.data_dir, num_examples=10):
            first, again, later = epoch(1, 0), epoch(1, 0), epoch(1, 1)
        for (x1, y1), (x2, y2) in zip(first, again, strict=True):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
        order = np.concatenate([y for _, y in first])
        later_order = np.concatenate([y for _, y in later])
        self.assertFalse(np.array_equal(order, later_order))
        np.testing.assert_array_equal(np.sort(order), np.sort(later_order))


class PreparedImagenetTest(base.TestCase):
    """A real imagenet2012 prepared by TFDS from tiny fake tar files.

    One training image per class, so a label names its example.
    """

    NUM_TRAIN = 10

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import tensorflow_datasets as tfds

        cls.data_dir = tempfile.mkdtemp(dir=os.environ["TMPDIR"])
        builder = tfds.builder("imagenet2012", data_dir=cls.data_dir)
        synsets = builder.info.features["label"].names[: cls.NUM_TRAIN]
        # Where the not-prepared error says the tar files go.
        manual_dir = os.path.join(cls.data_dir, "downloads", "manual")
        _write_fake_ilsvrc2012(manual_dir, synsets, 5, np.random.default_rng(0))
        builder.download_and_prepare()

    def _labels(self, **kwargs):
        kwargs = {"data_dir": self.data_dir, "image_size": 16, **kwargs}
        return _labels(imagenet.train_dataset(3, drop_remainder=False, **kwargs))

    def test_shards_are_disjoint_and_cover_the_split(self):
        for num_shards in (2, 3):
            shards = [
                self._labels(num_shards=num_shards, shard_index=i)
                for i in range(num_shards)
            ]
            sizes = [len(shard) for shard in shards]
            self.assertLessEqual(max(sizes) - min(sizes), 1, num_shards)
            everything = np.concatenate(shards)
            np.testing.assert_array_equal(
                np.sort(everything), np.arange(self.NUM_TRAIN)
            )

    def test_order_is_fixed_per_seed_epoch_and_shard(self):
        order = self._labels(seed=4, epoch=2)
        np.testing.assert_array_equal(order, self._labels(seed=4, epoch=2))
        self.assertFalse(np.array_equal(order, self._labels(seed=4, epoch=3)))
        self.assertFalse(np.array_equal(order, self._labels(seed=5, epoch=2)))
        np.testing.assert_array_equal(np.sort(order), np.arange(self.NUM_TRAIN))

    def test_unseeded_train(self):
        labels = self._labels(seed=None)
        np.testing.assert_array_equal(np.sort(labels), np.arange(self.NUM_TRAIN))

    def test_a_cached_shard_reads_its_files_once(self):
        data_dir = tempfile.mkdtemp(dir=os.environ["TMPDIR"])
        shutil.copytree(self.data_dir, data_dir, dirs_exist_ok=True)
        source = StreamingSource(
            "imagenet2012", data_dir, 16, 1000, {}, cache=True, drop_remainder=False
        )

        def epoch(number, source=source):
            return _labels(source.train(2, 7, number, shard_index=1, num_shards=2))

        first = epoch(0)
        records = glob.glob(
            os.path.join(data_dir, "**", "*-train.tfrecord*"), recursive=True
        )
        self.assertNotEmpty(records)
        for path in records:  # later epochs must come from memory
            os.remove(path)
        second = epoch(1)
        np.testing.assert_array_equal(np.sort(first), np.sort(second))
        self.assertLen(first, self.NUM_TRAIN // 2)
        self.assertFalse(np.array_equal(first, second))  # each epoch reshuffles
        uncached = dataclasses.replace(source, cache=False, _shards={})
        with self.assertRaises(tf.errors.NotFoundError):
            epoch(1, uncached)

    def test_eval_order_is_fixed(self):
        dataset = imagenet.eval_dataset(2, data_dir=self.data_dir, image_size=16)
        self.assertEqual([len(y) for _, y in dataset], [2, 2, 1])
        rebuilt = imagenet.eval_dataset(
            2, data_dir=self.data_dir, image_size=16, cache=True
        )
        np.testing.assert_array_equal(_labels(dataset), _labels(rebuilt))

    def test_bad_shard_index(self):
        with self.assertRaisesRegex(ValueError, r"shard_index=2 .*num_shards=2"):
            imagenet.train_dataset(
                3, data_dir=self.data_dir, num_shards=2, shard_index=2
            )


class NotPreparedTest(base.TestCase):
    def test_error_says_where_the_tar_files_go_and_how_to_prepare(self):
        data_dir = os.path.join(self.tempdir(), "tfds")
        calls = {
            "info": lambda: imagenet.info(data_dir=data_dir),
            "train": lambda: imagenet.train_dataset(8, data_dir=data_dir),
            "eval": lambda: imagenet.eval_dataset(8, data_dir=data_dir),
        }
        for kind, call in calls.items():
            start = time.monotonic()
            with self.assertRaises(FileNotFoundError, msg=kind) as raised:
                call()
            self.assertLess(time.monotonic() - start, 5, kind)
            message = str(raised.exception)
            manual_dir = os.path.join(data_dir, "downloads", "manual")
            for part in (
                f"'{manual_dir}/'",
                "ILSVRC2012_img_train.tar",
                "ILSVRC2012_img_val.tar",
                f"data_dir='{data_dir}').download_and_prepare()",
                f"tfds build imagenet2012 --manual_dir={manual_dir} "
                f"--data_dir={data_dir}",
            ):
                self.assertIn(part, message, kind)
        self.assertFalse(os.path.exists(data_dir))  # Nothing was downloaded.

    def test_unknown_dataset(self):
        with self.assertRaisesRegex(ValueError, "'no_such_dataset'"):
            imagenet.info(name="no_such_dataset", data_dir=self.tempdir())
