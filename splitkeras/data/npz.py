"""Reader for datasets saved as one .npz file with the Keras array names."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from splitkeras.data.arrays import DatasetArrays

# The names `keras.datasets.*.load_data()` returns, in that order.
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike, name: str) -> DatasetArrays:
    """Loads a dataset from a .npz file holding the arrays of `NPZ_KEYS`.

    Such a file is written by
    `np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)`.

    Args:
      path: The .npz file.
      name: Dataset name to record in the result.

    Returns:
      The dataset; images keep their stored dtype and get a channel axis if
      grayscale, labels become 1-D int64, num_classes is one more than the
      largest label.

    Raises:
      ValueError: If the file is not a readable .npz archive or lacks a key.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"'{path}' is not a readable .npz file: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"'{path}' holds a single array, not an .npz archive; save the "
            f"dataset with np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)."
        )
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"'{path}' lacks {', '.join(missing)}; keys found: "
                f"{', '.join(archive.files) or 'none'}. Save the dataset with "
                f"np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)."
            )
        arrays = {key: archive[key] for key in NPZ_KEYS}
    return DatasetArrays.from_arrays(name=name, source=str(path), **arrays)
