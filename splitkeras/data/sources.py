"""One entry point that loads a dataset from IDX files, a .npz file or TFDS."""

from __future__ import annotations

import os
import pathlib

from splitkeras.data import idx, npz, tfds_source
from splitkeras.data.arrays import DatasetArrays


def load(
    name: str,
    path: str | os.PathLike | None = None,
    download: bool = True,
    *,
    train_percent: int = 80,
    download_host: str = "storage.googleapis.com",
    download_port: int = 443,
    probe_timeout: float = 3.0,
) -> DatasetArrays:
    """Loads an image classification dataset fully into memory.

    Where the data comes from depends on `path`:

    * a folder with the four MNIST-format IDX files (`idx.IDX_FILENAMES`,
      each optionally gzipped): those files;
    * a `.npz` file with the keys x_train, y_train, x_test, y_test: that file;
    * anything else (including None): TFDS dataset `name`, with `path` as
      the TFDS data_dir.

    Args:
      name: Dataset name; the TFDS name when loading from TFDS.
      path: IDX folder, .npz file or TFDS data_dir; None for the TFDS default
        data_dir.
      download: Whether TFDS may download a dataset that is not prepared.
      train_percent: For TFDS datasets without a 'test' split, the percentage
        of 'train' used for training; the rest becomes the test split.
      download_host: Host probed before a TFDS download, so that an offline
        machine fails at once instead of in TFDS's retry loop.
      download_port: Port probed on `download_host`.
      probe_timeout: Seconds the probe may take.

    Returns:
      The dataset.

    Raises:
      FileNotFoundError: If `path` does not exist, an IDX folder lacks a file,
        or a TFDS dataset is not prepared and cannot be downloaded.
      ValueError: If a file is malformed, `name` is not a TFDS dataset, or
        `train_percent` is not in (0, 100).
      NotImplementedError: For 'imagenet2012', which does not fit in memory.
    """
    if not 0 < train_percent < 100:
        raise ValueError(
            f"train_percent={train_percent} must be between 0 and 100 (exclusive)."
        )
    if path is not None:
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"data path '{path}' does not exist; pass an existing folder of "
                "IDX files, a .npz file, or a TFDS data_dir."
            )
        if path.is_file():
            if path.suffix != ".npz":
                raise ValueError(
                    f"data path '{path}' is a file but not a .npz file; pass a "
                    ".npz file, a folder of IDX files, or a TFDS data_dir."
                )
            return npz.load_npz(path, name)
        if idx.find_idx_files(path):
            return idx.load_idx_dir(path, name)
    if name == "imagenet2012":
        raise NotImplementedError(
            "imagenet2012 does not fit in numpy arrays and cannot be loaded with "
            "load(); it is read as a stream: splitkeras.data.imagenet, or "
            "splitkeras.builders.load_data(config) with the imagenet_alexnet config"
        )
    return tfds_source.load_tfds(
        name,
        data_dir=None if path is None else str(path),
        download=download,
        train_percent=train_percent,
        download_host=download_host,
        download_port=download_port,
        probe_timeout=probe_timeout,
    )
