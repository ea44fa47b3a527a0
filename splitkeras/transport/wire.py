"""Arrays and envelopes: protocol messages as protobuf bytes, and back.

The gRPC transport sends each cut tensor as the parts its codec produced
(`Encoded`), and labels, sample weights, losses and ids as plain arrays.
Everything that arrives is checked before it is used: `parse_envelope` and
`check_encoded` raise `WireError` naming what is wrong (a truncated payload,
a dtype or shape the receiver does not expect, a non-finite value), and the
server turns that into an INVALID_ARGUMENT status without touching its state.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from splitkeras.protocol import Kind
from splitkeras.transport.proto import wire_pb2

__all__ = [
    "WireError",
    "check_encoded",
    "from_array",
    "parse",
    "to_array",
]

# dtypes an array on the wire may have (anything else is refused).
_DTYPES = {
    name: tf.as_dtype(name).as_numpy_dtype
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int8",
        "uint8",
        "int32",
        "int64",
    )
}


class WireError(ValueError):
    """An arriving message is malformed; the message says how."""


def to_array(value) -> wire_pb2.Array:
    """A tensor or numpy array as an `Array`."""
    array = wire_pb2.Array()
    fill_array(array, value)
    return array


def fill_array(array: wire_pb2.Array, value) -> None:
    """Writes a tensor or numpy array into the message `array` in place.

    Filling a field in place saves the copy that assigning a finished
    message makes (it matters for activations of tens of megabytes).
    """
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    value = np.asarray(value, order="C")  # keeps 0-d arrays 0-d
    array.dtype = value.dtype.name
    array.shape[:] = value.shape
    array.data = value.tobytes(order="C")


def from_array(array: wire_pb2.Array, what: str) -> np.ndarray:
    """The numpy array an `Array` holds; `WireError` if it is inconsistent."""
    if array.dtype not in _DTYPES:
        raise WireError(
            f"{what}: dtype {array.dtype!r} is not allowed on the wire "
            f"(allowed: {', '.join(_DTYPES)})"
        )
    if any(d < 0 for d in array.shape):
        raise WireError(f"{what}: negative dimension in shape {list(array.shape)}")
    dtype = np.dtype(_DTYPES[array.dtype])
    count = math.prod(int(d) for d in array.shape)  # Python ints: no overflow
    data = array.data  # each read of a bytes field copies it: read once
    if len(data) != count * dtype.itemsize:
        raise WireError(
            f"{what}: payload has {len(data)} bytes, shape "
            f"{list(array.shape)} of {array.dtype} needs {count * dtype.itemsize} "
            "(truncated or padded)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(tuple(array.shape))


def parse(cls, data: bytes, what: str):
    """Parses serialized protobuf `data` as `cls`; `WireError` if it cannot."""
    try:
        return cls.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise WireError(f"{what} could not be parsed (truncated?): {e}") from None


def encode_tensor(codec, tensor, into: wire_pb2.Encoded | None = None):
    """One float (or integer) tensor encoded with `codec`, as `Encoded`.

    With `into` (e.g. `envelope.tensors.add()`) it is filled in place.
    """
    tensor = tf.convert_to_tensor(tensor)
    return encoded_from_parts(
        codec, tensor.dtype, tensor.shape, codec.encode(tensor), into
    )


def encoded_from_parts(codec, dtype, shape, parts, into=None) -> wire_pb2.Encoded:
    """`Encoded` from a codec's wire parts (tensors or numpy arrays)."""
    encoded = wire_pb2.Encoded() if into is None else into
    encoded.codec = codec.name
    encoded.dtype = tf.as_dtype(dtype).name
    encoded.shape[:] = [int(d) for d in shape]
    for part in parts:
        fill_array(encoded.parts.add(), part)
    return encoded


def check_encoded(encoded, codec, dtype, shape, what) -> list:
    """The parts of `encoded` as numpy arrays, checked against expectations.

    Args:
      encoded: the arriving `Encoded`.
      codec: the codec the receiver expects.
      dtype: the decoded dtype the receiver expects.
      shape: the expected decoded shape; None entries match any size.
      what: names the tensor in error messages.

    Raises:
      WireError: wrong codec, dtype, shape, part count or part dtype, or a
        truncated part.
    """
    dtype = tf.as_dtype(dtype)
    if encoded.codec != codec.name:
        raise WireError(
            f"{what}: encoded with codec {encoded.codec!r}, this party expects "
            f"{codec.name!r}"
        )
    if encoded.dtype != dtype.name:
        raise WireError(f"{what}: dtype {encoded.dtype!r}, expected {dtype.name!r}")
    got = list(encoded.shape)
    if len(got) != len(shape) or any(
        e is not None and g != e for g, e in zip(got, shape)
    ):
        expected = ["batch" if e is None else e for e in shape]
        raise WireError(f"{what}: shape {got}, expected {expected}")
    if any(d < 0 for d in got):
        raise WireError(f"{what}: negative dimension in shape {got}")
    wire_dtypes = codec.wire_dtypes(dtype)
    if len(encoded.parts) != len(wire_dtypes):
        raise WireError(
            f"{what}: {len(encoded.parts)} wire parts, codec {codec.name!r} "
            f"sends {len(wire_dtypes)}"
        )
    parts = []
    for i, (part, wire_dtype) in enumerate(zip(encoded.parts, wire_dtypes)):
        if part.dtype != wire_dtype.name:
            raise WireError(
                f"{what}: wire part {i} has dtype {part.dtype!r}, codec "
                f"{codec.name!r} sends {wire_dtype.name!r}"
            )
        parts.append(from_array(part, f"{what} part {i}"))
    return parts


def decode_tensor(codec, encoded, parts, what) -> tf.Tensor:
    """Decodes checked `parts`; `WireError` if they do not fit or are not finite."""
    dtype = tf.as_dtype(encoded.dtype)
    try:
        tensor = codec.decode(
            tuple(tf.constant(p) for p in parts), dtype, list(encoded.shape)
        )
        tensor = tf.ensure_shape(tensor, list(encoded.shape))
    except (tf.errors.OpError, ValueError, TypeError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise WireError(
            f"{what}: wire parts do not decode to {list(encoded.shape)}: {message}"
        ) from None
    if dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(tensor))):
        raise WireError(f"{what}: has non-finite values (NaN or Inf)")
    return tensor


def kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"unknown kind {kind}"
