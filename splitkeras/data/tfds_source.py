"""Loading a TensorFlow Datasets (TFDS) dataset fully into numpy arrays."""

from __future__ import annotations

import socket

import numpy as np

from splitkeras.data.arrays import DatasetArrays


def download_host_reachable(host: str, port: int, timeout: float) -> bool:
    """Returns whether a TCP connection to `host:port` opens within `timeout`.

    TFDS retries failed downloads for many minutes; probing first lets an
    offline machine fail in seconds.

    Args:
      host: Host name or address.
      port: TCP port.
      timeout: Seconds to wait for the connection.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_tfds(
    name: str,
    data_dir: str | None,
    download: bool,
    *,
    train_percent: int,
    download_host: str,
    download_port: int,
    probe_timeout: float,
) -> DatasetArrays:
    """Loads the train and test splits of a TFDS image dataset into memory.

    Datasets without a 'test' split are split deterministically: the first
    `train_percent`% of 'train' (rounded as TFDS rounds `train[:80%]`) for
    training, the rest for testing.

    Args:
      name: TFDS dataset name, e.g. 'mnist' or 'colorectal_histology'.
      data_dir: TFDS data directory; None for the TFDS default.
      download: Whether to download and prepare the dataset if it is not
        prepared yet.
      train_percent: Share of 'train' kept for training when there is no
        'test' split, in percent.
      download_host: Host probed before downloading.
      download_port: Port probed on `download_host`.
      probe_timeout: Seconds the probe may take.

    Returns:
      The dataset, with num_classes from the 'label' feature.

    Raises:
      ValueError: If TFDS has no dataset `name`, or it has no 'train' split.
      FileNotFoundError: If the dataset is not prepared and cannot be
        downloaded (`download` is False or `download_host` is unreachable).
    """
    # Imported here because importing TFDS takes seconds and most runs read
    # local files instead.
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"unknown TFDS dataset {name!r}; use a name from "
            "tfds.list_builders() (e.g. mnist, fashion_mnist, cifar10) or pass "
            "--config.data.path=<folder of IDX files or .npz file>."
        ) from None
    if not builder.is_prepared():
        _download(builder, download, download_host, download_port, probe_timeout)

    splits = builder.info.splits
    if "train" not in splits:
        raise ValueError(
            f"TFDS dataset {name!r} has no 'train' split; splits are: "
            f"{', '.join(splits) or 'none'}. Pass --config.data.path instead."
        )
    x_train, y_train = _load_split(builder, "train")
    if "test" in splits:
        x_test, y_test = _load_split(builder, "test")
    else:
        # Slicing in numpy reads 'train' once; the rounding matches TFDS's
        # train[:80%].
        cut = int(round(train_percent * len(x_train) / 100))
        x_train, x_test = x_train[:cut], x_train[cut:]
        y_train, y_test = y_train[:cut], y_train[cut:]
    return DatasetArrays.from_arrays(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=builder.info.features["label"].num_classes,
        source=f"TFDS {name}",
    )


def _download(builder, download, host, port, timeout) -> None:
    """Downloads and prepares the dataset, or says why it cannot."""
    reason = None
    if not download:
        reason = "downloading is disabled (download=False)"
    elif not download_host_reachable(host, port, timeout):
        reason = f"{host}:{port} is unreachable (no network)"
    if reason:
        raise FileNotFoundError(
            f"TFDS dataset {builder.name!r} is not prepared in "
            f"'{builder.data_dir}' and cannot be downloaded: {reason}. Pass "
            "--config.data.path=<folder of IDX files or .npz file>, or for "
            "Fashion-MNIST install Debian's dataset-fashion-mnist (apt-get "
            "install dataset-fashion-mnist) and pass "
            "--config.data.path=/usr/share/datasets/fashion-mnist."
        )
    builder.download_and_prepare()


def _load_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    # batch_size=-1 returns the whole split as one pair of eager tensors.
    images, labels = builder.as_dataset(split=split, as_supervised=True, batch_size=-1)
    return images.numpy(), labels.numpy()
