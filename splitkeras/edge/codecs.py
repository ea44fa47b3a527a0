"""The wire codecs in numpy, for clients without TensorFlow.

The same arithmetic as `splitkeras.transport.codec` (float32 throughout,
round half to even, the same scale rule), so a LiteRT edge client and a
Keras client put the same bytes on the wire (tested against the TensorFlow
codecs). Top-k is not available here.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["CODECS", "decode", "encode", "wire_dtypes"]

_INT8_MAX = np.float32(127.0)
_CASTS = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
CODECS = (*_CASTS, "int8", "int8_channel")


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(
            f"codec {codec!r} is not available on the edge client (no "
            f"TensorFlow); choose one of {', '.join(CODECS)}"
        )


def _floating(dtype) -> bool:
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype == _CASTS["bfloat16"]


def wire_dtypes(codec: str, dtype) -> list:
    """The dtypes of the parts `codec` sends for a tensor of `dtype`."""
    _check(codec)
    if not _floating(dtype):
        return [np.dtype(dtype)]
    if codec in _CASTS:
        return [_CASTS[codec]]
    return [np.dtype(np.int8), np.dtype(np.float32)]


def part_shapes(codec: str, dtype, shape) -> list:
    """The exact shapes of the parts `codec` sends for a tensor of `shape`."""
    _check(codec)
    shape = list(shape)
    if not _floating(dtype) or codec in _CASTS:
        return [shape]
    return [shape, [shape[-1]] if codec == "int8_channel" else []]


def encode(codec: str, array: np.ndarray) -> list:
    """The wire parts of `array`."""
    _check(codec)
    array = np.asarray(array)
    if not _floating(array.dtype):
        return [array]
    if codec in _CASTS:
        return [array.astype(_CASTS[codec], copy=False)]
    x = array.astype(np.float32, copy=False)
    magnitude = np.abs(x)
    if codec == "int8_channel":
        if x.ndim == 0:
            raise ValueError("codec 'int8_channel' needs a tensor of rank >= 1")
        peak = magnitude.reshape(-1, x.shape[-1]).max(axis=0, initial=0.0)
    else:
        peak = np.float32(magnitude.max(initial=0.0))
    peak = np.asarray(peak, np.float32)
    scale = np.where(peak > 0, peak / _INT8_MAX, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(x / scale), -_INT8_MAX, _INT8_MAX)
    return [q.astype(np.int8), scale]


def decode(codec: str, parts, dtype) -> np.ndarray:
    """The array of `dtype` that `parts` encode."""
    _check(codec)
    dtype = np.dtype(dtype)
    if not _floating(dtype) or codec in _CASTS:
        (wire,) = parts
        return wire.astype(dtype, copy=False)
    q, scale = parts
    return (q.astype(np.float32) * scale).astype(dtype, copy=False)
