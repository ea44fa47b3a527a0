"""Reader for MNIST-style IDX files, gzipped or plain.

The IDX format (http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number
(two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the data in row-major order.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import zlib

import numpy as np

from splitkeras.data.arrays import DatasetArrays

# Array name -> file name (without the optional .gz) used by MNIST,
# Fashion-MNIST, KMNIST and Debian's dataset-fashion-mnist package.
IDX_FILENAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# IDX type code -> numpy dtype; multi-byte types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def find_idx_files(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Returns the IDX files of `IDX_FILENAMES` present in `directory`.

    A plain file is preferred over its gzipped twin when both exist.

    Args:
      directory: Folder to look in.

    Returns:
      Array name ('x_train', ...) -> path, for the files that were found.
    """
    directory = pathlib.Path(directory)
    found = {}
    for key, stem in IDX_FILENAMES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    return found


def read_idx(path: str | os.PathLike, expected_ndim: int) -> np.ndarray:
    """Reads one IDX file, gzipped or not (detected from its content).

    Args:
      path: The IDX file.
      expected_ndim: Number of dimensions the file must hold (3 for images,
        1 for labels).

    Returns:
      The array, in native byte order.

    Raises:
      ValueError: If the magic number is wrong, or the file is truncated or
        has trailing bytes.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as raw:
        is_gzip = raw.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    try:
        with gzip.open(path, "rb") if is_gzip else open(path, "rb") as f:
            return _read_idx_stream(f, path, expected_ndim)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(
            f"'{path}' is a damaged gzip file ({e}); download it again."
        ) from e


def _read_idx_stream(f: io.BufferedIOBase, path: pathlib.Path, ndim: int):
    magic = f.read(4)
    valid = (
        len(magic) == 4
        and magic[:2] == b"\0\0"
        and magic[2] in _IDX_DTYPES
        and magic[3] == ndim
    )
    if not valid:
        raise ValueError(
            f"'{path}' is not a {ndim}-D IDX file: magic number 0x{magic.hex()}, "
            f"expected 0x0000TT{ndim:02x} (TT a type code, 08 for uint8). "
            "Check that it is the right file and not corrupt."
        )
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"'{path}' is truncated: magic number 0x{magic.hex()} announces "
            f"{ndim} dimensions but the header ends after {len(dims)} of "
            f"{4 * ndim} size bytes. Download it again."
        )
    shape = tuple(int(size) for size in np.frombuffer(dims, dtype=">u4"))
    dtype = _IDX_DTYPES[magic[2]]
    # Reading straight into the result avoids holding the file twice.
    buffer = np.empty(int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    filled = 0
    try:
        while filled < len(buffer):
            count = f.readinto(buffer[filled:])
            if not count:
                break
            filled += count
    except EOFError:  # A gzip stream cut short; reported below.
        pass
    if filled < len(buffer):
        problem = "is truncated"
    elif f.read(1):
        problem = "has trailing bytes after them"
    else:
        data = buffer.view(dtype).reshape(shape)
        return data.astype(dtype.newbyteorder("="), copy=False)
    raise ValueError(
        f"'{path}' does not match its header: magic number 0x{magic.hex()} and "
        f"shape {shape} need {len(buffer)} data bytes, but the file {problem}. "
        "Download it again."
    )


def load_idx_dir(directory: str | os.PathLike, name: str) -> DatasetArrays:
    """Loads the four IDX files of an MNIST-style dataset from a folder.

    Args:
      directory: Folder holding the files named in `IDX_FILENAMES`, each
        optionally gzipped.
      name: Dataset name to record in the result.

    Returns:
      The dataset; images keep their stored dtype and get a channel axis,
      num_classes is one more than the largest label.

    Raises:
      FileNotFoundError: If any of the four files is missing.
      ValueError: If a file is not valid IDX or image and label counts differ.
    """
    files = find_idx_files(directory)
    missing = [f"{IDX_FILENAMES[k]}[.gz]" for k in IDX_FILENAMES if k not in files]
    if missing:
        raise FileNotFoundError(
            f"IDX folder '{directory}' lacks {', '.join(missing)}; found "
            f"{sorted(p.name for p in files.values())}. Put all four MNIST-format "
            "files there."
        )
    arrays = {
        key: read_idx(path, expected_ndim=1 if key.startswith("y") else 3)
        for key, path in files.items()
    }
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ValueError(
                f"'{files[f'x_{split}']}' holds {len(x)} images but "
                f"'{files[f'y_{split}']}' holds {len(y)} labels; they must match."
            )
    return DatasetArrays.from_arrays(name=name, source=str(directory), **arrays)
