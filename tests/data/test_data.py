"""Tests for splitkeras.data: loading, partitioning and input pipelines."""

import gzip
import pathlib
import socket
import tempfile
import time

import numpy as np
import pytest

from splitkeras import data
from splitkeras.data import tfds_source

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True, scope="module")
def _private_tmpdir(tmp_path_factory):
    """Keeps the temp folders TFDS and autograph leave behind out of /tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        patch.setattr(tempfile, "tempdir", None)  # Forget the cached default.
        yield


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dir(directory, arrays, gz):
    for key, stem in IDX_NAMES.items():
        raw = _idx_bytes(arrays[key])
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


def _tiny_arrays(rng, channels=None):
    image_shape = (5, 4) if channels is None else (5, 4, channels)
    return {
        "x_train": rng.integers(0, 256, (7, *image_shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 7, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (3, *image_shape), dtype=np.uint8),
        "y_test": np.array([0, 9, 4], dtype=np.uint8),
    }


def _assert_round_trip(loaded, arrays):
    for key in ("x_train", "x_test"):
        assert getattr(loaded, key).dtype == np.uint8
        expected = arrays[key]
        if expected.ndim == 3:
            expected = expected[..., np.newaxis]
        np.testing.assert_array_equal(getattr(loaded, key), expected)
    for key in ("y_train", "y_test"):
        assert getattr(loaded, key).dtype == np.int64
        np.testing.assert_array_equal(getattr(loaded, key), arrays[key].ravel())


class TestIdx:
    @pytest.mark.parametrize("gz", [True, False])
    def test_round_trip(self, tmp_path, gz):
        arrays = _tiny_arrays(np.random.default_rng(0))
        _write_idx_dir(tmp_path, arrays, gz)
        loaded = data.load("tiny", path=tmp_path)
        _assert_round_trip(loaded, arrays)
        assert loaded.input_shape == (5, 4, 1)
        assert loaded.num_classes == 10
        assert loaded.name == "tiny"

    def test_bad_magic_names_file_and_magic(self, tmp_path):
        arrays = _tiny_arrays(np.random.default_rng(0))
        _write_idx_dir(tmp_path, arrays, gz=True)
        # A labels file (magic 0x00000801) where images are expected.
        bad = tmp_path / "train-images-idx3-ubyte.gz"
        bad.write_bytes(gzip.compress(_idx_bytes(arrays["y_train"])))
        with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz") as e:
            data.load("tiny", path=tmp_path)
        assert "0x00000801" in str(e.value)

    @pytest.mark.parametrize("gz", [True, False])
    def test_truncated_file_names_file_and_magic(self, tmp_path, gz):
        arrays = _tiny_arrays(np.random.default_rng(0))
        _write_idx_dir(tmp_path, arrays, gz)
        images = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
        content = images.read_bytes()
        images.write_bytes(content[: len(content) * 2 // 3])
        with pytest.raises(ValueError, match="train-images-idx3-ubyte") as e:
            data.load("tiny", path=tmp_path)
        assert "0x00000803" in str(e.value)
        assert "truncated" in str(e.value)

    def test_trailing_bytes_are_rejected(self, tmp_path):
        _write_idx_dir(tmp_path, _tiny_arrays(np.random.default_rng(0)), gz=False)
        labels = tmp_path / "t10k-labels-idx1-ubyte"
        labels.write_bytes(labels.read_bytes() + b"\0")
        with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*trailing"):
            data.load("tiny", path=tmp_path)

    def test_missing_file_is_listed(self, tmp_path):
        _write_idx_dir(tmp_path, _tiny_arrays(np.random.default_rng(0)), gz=True)
        (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
            data.load("tiny", path=tmp_path)

    @pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="no Fashion-MNIST")
    def test_real_fashion_mnist(self):
        dataset = data.load("fashion_mnist", path=FASHION_MNIST_DIR)
        assert dataset.x_train.shape == (60000, 28, 28, 1)
        assert dataset.x_test.shape == (10000, 28, 28, 1)
        assert dataset.x_train.dtype == np.uint8
        assert dataset.num_classes == 10
        # Fashion-MNIST is balanced: 6000 training images per class.
        np.testing.assert_array_equal(np.bincount(dataset.y_train), [6000] * 10)


class TestNpz:
    @pytest.mark.parametrize("channels", [None, 3])
    def test_round_trip(self, tmp_path, channels):
        arrays = _tiny_arrays(np.random.default_rng(1), channels)
        arrays["y_train"] = arrays["y_train"][:, np.newaxis]  # Keras CIFAR style.
        np.savez(tmp_path / "tiny.npz", **arrays)
        loaded = data.load("tiny", path=tmp_path / "tiny.npz")
        _assert_round_trip(loaded, arrays)
        assert loaded.input_shape == (5, 4, channels or 1)

    def test_missing_key_lists_keys_found(self, tmp_path):
        arrays = _tiny_arrays(np.random.default_rng(1))
        del arrays["y_test"]
        np.savez(tmp_path / "tiny.npz", **arrays)
        with pytest.raises(ValueError, match="lacks y_test") as e:
            data.load("tiny", path=tmp_path / "tiny.npz")
        assert "keys found: x_train, y_train, x_test" in str(e.value)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        data.load("mnist", path=tmp_path / "no-such-folder")


def test_dataset_arrays_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.DatasetArrays(
            x_train=np.zeros((3, 2, 2, 1), np.uint8),
            y_train=np.zeros(2, np.int64),
            x_test=np.zeros((1, 2, 2, 1), np.uint8),
            y_test=np.zeros(1, np.int64),
            num_classes=2,
            name="broken",
        )


def _prepare_mock_metadata(data_dir, name, split_sizes):
    """Writes TFDS metadata so that `mock_data` serves `name` as prepared."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0)
                for split, size in split_sizes.items()
            ]
        )
    )
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


def _mock_tfds(data_dir, num_examples):
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(
        num_examples=num_examples,
        policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=str(data_dir),
    )


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestTfds:
    def test_mnist_train_and_test(self, tmp_path):
        _prepare_mock_metadata(tmp_path, "mnist", {"train": 12, "test": 12})
        with _mock_tfds(tmp_path, num_examples=12):
            dataset = data.load("mnist", path=tmp_path)
        assert dataset.x_train.shape == (12, 28, 28, 1)
        assert dataset.x_test.shape == (12, 28, 28, 1)
        assert dataset.x_train.dtype == np.uint8
        assert dataset.y_train.dtype == np.int64
        assert dataset.num_classes == 10

    def test_colorectal_histology_is_split_80_20(self, tmp_path):
        import tensorflow_datasets as tfds

        _prepare_mock_metadata(tmp_path, "colorectal_histology", {"train": 10})
        with _mock_tfds(tmp_path, num_examples=10):
            dataset = data.load("colorectal_histology", path=tmp_path)
            builder = tfds.builder("colorectal_histology", data_dir=tmp_path)
            full = builder.as_dataset(split="train", as_supervised=True, batch_size=-1)
            images, labels = tfds.as_numpy(full)
        assert dataset.x_train.shape == (8, 150, 150, 3)
        assert dataset.x_test.shape == (2, 150, 150, 3)
        assert dataset.num_classes == 8
        np.testing.assert_array_equal(dataset.x_train, images[:8])
        np.testing.assert_array_equal(dataset.x_test, images[8:])
        np.testing.assert_array_equal(dataset.y_test, labels[8:])

    def test_not_prepared_without_download_fails_fast(self, tmp_path):
        start = time.monotonic()
        with pytest.raises(FileNotFoundError) as e:
            data.load("cifar10", path=tmp_path, download=False)
        assert time.monotonic() - start < 5
        assert "'cifar10'" in str(e.value)
        assert str(tmp_path) in str(e.value)
        assert "dataset-fashion-mnist" in str(e.value)

    def test_not_prepared_and_offline_fails_fast(self, tmp_path):
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match="unreachable"):
            data.load(
                "cifar10",
                path=tmp_path,
                download_host="127.0.0.1",
                download_port=_closed_port(),
            )
        assert time.monotonic() - start < 5

    def test_unknown_name(self, tmp_path):
        with pytest.raises(ValueError, match="'no_such_dataset'"):
            data.load("no_such_dataset", path=tmp_path)

    def test_imagenet_is_not_loaded_into_memory(self):
        with pytest.raises(NotImplementedError, match="read as a stream"):
            data.load("imagenet2012")

    def test_download_host_reachable(self):
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            assert tfds_source.download_host_reachable("127.0.0.1", port, 1.0)
        assert not tfds_source.download_host_reachable("127.0.0.1", _closed_port(), 1.0)


def _uniform_labels(num_examples=2000, num_classes=10):
    return np.random.default_rng(7).integers(0, num_classes, num_examples)


class TestPartition:
    @pytest.mark.parametrize("method", ["iid", "dirichlet"])
    @pytest.mark.parametrize("num_clients", [1, 3, 5])
    def test_disjoint_complete_nonempty(self, method, num_clients):
        labels = _uniform_labels()
        shards = data.partition(labels, num_clients, method, alpha=0.1, seed=3)
        assert len(shards) == num_clients
        assert all(len(shard) > 0 for shard in shards)
        everything = np.concatenate(shards)
        np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))

    @pytest.mark.parametrize("method", ["iid", "dirichlet"])
    def test_deterministic_for_a_seed(self, method):
        labels = _uniform_labels()
        first = data.partition(labels, 4, method, seed=11)
        again = data.partition(labels, 4, method, seed=11)
        other = data.partition(labels, 4, method, seed=12)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(first, other))

    def test_iid_shard_sizes_differ_by_at_most_one(self):
        sizes = [len(s) for s in data.partition(_uniform_labels(1003), 7, "iid")]
        assert max(sizes) - min(sizes) <= 1

    def test_dirichlet_small_alpha_skews_labels(self):
        labels = _uniform_labels()

        def mean_max_class_share(method, alpha):
            """Share of a client's data in its largest class, over clients and seeds."""
            shares = [
                np.bincount(labels[shard], minlength=10).max() / len(shard)
                for seed in range(10)
                for shard in data.partition(labels, 5, method, alpha, seed)
            ]
            return np.mean(shares)

        # 10 classes, 5 clients: IID shards hold about 1/10 of each class, while
        # Dirichlet(0.1) gives each client about two dominant classes (expected
        # mean largest share 0.48, estimated over 200 seeds).
        assert mean_max_class_share("iid", 0.1) < 0.15
        assert mean_max_class_share("dirichlet", 0.1) > 0.4
        assert mean_max_class_share("dirichlet", 100.0) < 0.15

    def test_dirichlet_repairs_empty_clients(self):
        # As many clients as examples: only a repair can fill every client.
        labels = np.array([0, 0, 0, 1, 1, 1])
        shards = data.partition(labels, 6, "dirichlet", alpha=0.01, seed=0)
        assert sorted(int(s[0]) for s in shards) == list(range(6))
        assert all(len(s) == 1 for s in shards)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"num_clients": 0}, "num_clients=0"),
            ({"num_clients": 11}, "num_clients=11"),
            ({"method": "shards"}, "'shards'; valid methods are: iid, dirichlet"),
            ({"method": "dirichlet", "alpha": 0.0}, "alpha=0.0"),
        ],
    )
    def test_invalid_arguments(self, kwargs, message):
        kwargs = {"num_clients": 2, **kwargs}
        with pytest.raises(ValueError, match=message):
            data.partition(np.zeros(10, np.int64), **kwargs)


def _labelled_by_index(num_examples=23):
    """Images whose label is their own index, so batch labels reveal order."""
    x = np.random.default_rng(5).integers(0, 256, (num_examples, 3, 3, 1), np.uint8)
    return x, np.arange(num_examples)


def _labels_in(dataset):
    return np.concatenate([y.numpy() for _, y in dataset])


class TestPipeline:
    def test_order_is_fixed_per_seed_and_epoch(self):
        x, y = _labelled_by_index()
        order = _labels_in(data.train_dataset(x, y, 5, seed=1, epoch=2))
        again = _labels_in(data.train_dataset(x, y, 5, seed=1, epoch=2))
        next_epoch = _labels_in(data.train_dataset(x, y, 5, seed=1, epoch=3))
        np.testing.assert_array_equal(order, again)
        np.testing.assert_array_equal(
            order, np.random.default_rng([1, 2]).permutation(len(x))
        )
        assert not np.array_equal(order, next_epoch)
        np.testing.assert_array_equal(np.sort(next_epoch), y)

    @pytest.mark.parametrize("skip", [0, 2, 4, 5])
    def test_skip_batches_gives_tail_of_epoch(self, skip):
        x, y = _labelled_by_index()
        full = list(data.train_dataset(x, y, 5, seed=0, epoch=0))
        tail = data.train_dataset(x, y, 5, seed=0, epoch=0, skip_batches=skip)
        assert int(tail.cardinality()) == len(full) - skip
        for (x_full, y_full), (x_tail, y_tail) in zip(full[skip:], tail, strict=True):
            np.testing.assert_array_equal(x_full.numpy(), x_tail.numpy())
            np.testing.assert_array_equal(y_full.numpy(), y_tail.numpy())

    def test_uint8_scaled_to_unit_float32(self):
        x, y = _labelled_by_index()
        for images, labels in data.train_dataset(x, y, 4, seed=0, epoch=0):
            assert images.dtype == "float32" and labels.dtype == "int64"
            np.testing.assert_allclose(images.numpy(), x[labels.numpy()] / 255.0)
            assert 0.0 <= images.numpy().min() and images.numpy().max() <= 1.0

    def test_float_images_pass_through(self):
        x = np.random.default_rng(0).normal(size=(6, 2, 2, 1)).astype(np.float32)
        images, _ = next(iter(data.eval_dataset(x, np.arange(6), 6)))
        np.testing.assert_array_equal(images.numpy(), x)

    def test_drop_remainder(self):
        x, y = _labelled_by_index()
        dataset = data.train_dataset(x, y, 5, seed=0, epoch=0, drop_remainder=True)
        assert [len(b) for _, b in dataset] == [5, 5, 5, 5]
        assert data.steps_per_epoch(23, 5, drop_remainder=True) == 4

    def test_eval_keeps_order_and_last_partial_batch(self):
        x, y = _labelled_by_index()
        dataset = data.eval_dataset(x, y, 5)
        assert [len(b) for _, b in dataset] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(_labels_in(dataset), y)
        assert data.steps_per_epoch(23, 5) == 5

    def test_skip_beyond_epoch_is_rejected(self):
        x, y = _labelled_by_index()
        with pytest.raises(ValueError, match="skip_batches=6"):
            data.train_dataset(x, y, 5, seed=0, epoch=0, skip_batches=6)


class TestBatchesIn:
    """What a client's BEGIN says it will train: a dataset's cardinality
    (unknown: 0, or counted when asked); a sized collection's length; 0 for
    an iterator."""

    def test_known_unknown_sized_and_iterators(self):
        import tensorflow as tf

        batches = tf.data.Dataset.range(10).batch(3)
        assert data.batches_in(batches) == 4
        filtered = tf.data.Dataset.range(10).filter(lambda i: i % 2 == 0).batch(2)
        assert int(filtered.cardinality()) == tf.data.UNKNOWN_CARDINALITY
        assert data.batches_in(filtered) == 0
        assert data.batches_in(filtered, count_unknown=True) == 3
        assert data.batches_in([(1, 2), (3, 4)]) == 2
        iterator = iter([(1, 2)])
        assert data.batches_in(iterator) == 0
        assert next(iterator) == (1, 2)  # not used up
