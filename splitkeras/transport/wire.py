"""Arrays and envelopes: protocol messages as protobuf bytes, and back.

The gRPC transport sends each cut tensor as the parts its codec produced
(`Encoded`), and labels, sample weights, losses and ids as plain arrays.
Everything that arrives is checked before it is used: `parse_envelope` and
`check_encoded` raise `WireError` naming what is wrong (a truncated payload,
a dtype or shape the receiver does not expect, a non-finite value), and the
server turns that into an INVALID_ARGUMENT status without touching its state.

Arrays, frames and envelopes are numpy and protobuf only (the TensorFlow-free
edge client uses them); encoding and decoding with a codec load TensorFlow.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
from google.protobuf.message import DecodeError

from splitkeras.protocol import Kind, Message, Status
from splitkeras.transport.proto import wire_pb2

__all__ = [
    "Payloads",
    "control_envelope",
    "control_message",
    "WireError",
    "check_encoded",
    "check_parts",
    "frame",
    "open_body",
    "from_array",
    "parse",
    "to_array",
]

# dtypes an array on the wire may have (anything else is refused).
_DTYPES = {
    name: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
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


def dtype_name(dtype) -> str:
    """The wire name of a dtype (a name, numpy dtype or tf.DType)."""
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else np.dtype(dtype).name


class WireError(ValueError):
    """An arriving message is malformed; the message says how."""


def to_array(value) -> wire_pb2.Array:
    """A tensor or numpy array as an `Array`."""
    array = wire_pb2.Array()
    fill_array(array, value)
    return array


def fill_array(array: wire_pb2.Array, value, payloads: list | None = None) -> None:
    """Writes a tensor or numpy array into the message `array` in place.

    With `payloads` (a list), the bytes do not go into the message: the array
    is appended to `payloads`, to travel after the envelope in a `frame`.
    """
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    value = np.asarray(value, order="C")  # keeps 0-d arrays 0-d
    array.dtype = value.dtype.name
    array.shape[:] = value.shape
    if payloads is None:
        array.data = value.tobytes(order="C")
    else:
        payloads.append(value)


def frame(envelope, payloads=()) -> bytes:
    """An Exchange body: the envelope, then its arrays' bytes out of line.

    Layout: one zero byte (a serialized message never starts with one), the
    envelope's length (4 bytes, little endian), the envelope, then the raw
    bytes of every `Array` left without `data`, in the order `open_body`
    reads them. Large tensors are copied once, instead of into and out of
    the protobuf message.
    """
    header = envelope.SerializeToString()
    chunks = [b"\x00", len(header).to_bytes(4, "little"), header]
    chunks += [memoryview(p.reshape(-1).view(np.uint8)) for p in payloads if p.size]
    return b"".join(chunks)


class Payloads:
    """The out-of-line array bytes of an arrived body, by array position."""

    def __init__(self, views=None):
        self.views = views or {}

    def array(self, array: wire_pb2.Array, key, what: str) -> np.ndarray:
        """The numpy array of `array` (at position `key`), checked."""
        if key in self.views:
            return self.views[key]
        return from_array(array, what)


def _array_keys(envelope):
    """(key, Array, name) of every array of an envelope, in frame order."""
    for i, encoded in enumerate(envelope.tensors):
        for j, part in enumerate(encoded.parts):
            yield ("tensors", i, j), part, f"tensor {i} part {j}"
    for name in ("labels", "sample_weight", "loss", "ids"):
        if envelope.HasField(name):
            yield name, getattr(envelope, name), name


def open_body(data: bytes, what: str):
    """(Envelope, Payloads) of an Exchange body: a `frame` or a plain envelope."""
    if not data or data[:1] != b"\x00":
        return parse(wire_pb2.Envelope, data, what), Payloads()
    if len(data) < 5:
        raise WireError(f"{what}: frame of {len(data)} bytes is truncated")
    size = int.from_bytes(data[1:5], "little")
    if 5 + size > len(data):
        raise WireError(
            f"{what}: frame header says {size} envelope bytes, only "
            f"{len(data) - 5} follow (truncated)"
        )
    envelope = parse(wire_pb2.Envelope, data[5 : 5 + size], what)
    tail, offset, views = memoryview(data)[5 + size :], 0, {}
    for key, array, name in _array_keys(envelope):
        if array.data:
            continue  # carried in the message itself
        dtype, count = _layout(array, name)
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(tail):
            raise WireError(
                f"{name}: shape {list(array.shape)} of {array.dtype} needs "
                f"{nbytes} bytes, the frame has {len(tail) - offset} left (truncated)"
            )
        view = np.frombuffer(tail, dtype=dtype, count=count, offset=offset)
        views[key] = view.reshape(tuple(array.shape))
        offset += nbytes
    if offset != len(tail):
        raise WireError(
            f"{what}: {len(tail) - offset} bytes after the last array (padded)"
        )
    return envelope, Payloads(views)


def _layout(array: wire_pb2.Array, what: str):
    """(numpy dtype, element count) of an `Array`, checked."""
    if array.dtype not in _DTYPES:
        raise WireError(
            f"{what}: dtype {array.dtype!r} is not allowed on the wire "
            f"(allowed: {', '.join(_DTYPES)})"
        )
    if any(d < 0 for d in array.shape):
        raise WireError(f"{what}: negative dimension in shape {list(array.shape)}")
    dtype = np.dtype(_DTYPES[array.dtype])
    return dtype, math.prod(int(d) for d in array.shape)  # Python ints: no overflow


def from_array(array: wire_pb2.Array, what: str) -> np.ndarray:
    """The numpy array an `Array` holds; `WireError` if it is inconsistent."""
    dtype, count = _layout(array, what)
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


def encode_tensor(codec, tensor, into=None, payloads=None):
    """One float (or integer) tensor encoded with `codec`, as `Encoded`.

    With `into` (e.g. `envelope.tensors.add()`) it is filled in place; with
    `payloads` its bytes go out of line (see `frame`).
    """
    import tensorflow as tf

    tensor = tf.convert_to_tensor(tensor)
    return encoded_from_parts(
        codec, tensor.dtype, tensor.shape, codec.encode(tensor), into, payloads
    )


def encoded_from_parts(
    codec, dtype, shape, parts, into=None, payloads=None
) -> wire_pb2.Encoded:
    """`Encoded` from a codec's wire parts (tensors or numpy arrays).

    `into` fills a message in place; `payloads` sends the bytes out of line.
    `codec` is a codec or its name (the edge client's codecs are numpy).
    """
    encoded = wire_pb2.Encoded() if into is None else into
    encoded.codec = codec if isinstance(codec, str) else codec.name
    encoded.dtype = dtype_name(dtype)
    encoded.shape[:] = [int(d) for d in shape]
    for part in parts:
        fill_array(encoded.parts.add(), part, payloads)
    return encoded


def check_encoded(encoded, codec, dtype, shape, what, payloads=None, index=0) -> list:
    """The parts of `encoded` as numpy arrays, checked against expectations.

    Args:
      encoded: the arriving `Encoded`.
      codec: the codec the receiver expects.
      dtype: the decoded dtype the receiver expects.
      shape: the expected decoded shape; None entries match any size.
      what: names the tensor in error messages.
      payloads: the body's `Payloads` (out-of-line bytes), if any.
      index: the tensor's position in the envelope (to find its payloads).

    Raises:
      WireError: wrong codec, dtype, shape, part count or part dtype, or a
        truncated part.
    """
    import tensorflow as tf

    dtype = tf.as_dtype(dtype)
    return check_parts(
        encoded,
        codec.name,
        dtype.name,
        shape,
        [d.name for d in codec.wire_dtypes(dtype)],
        lambda got: _part_shapes(codec, dtype, got),
        what,
        payloads,
        index,
    )


def check_parts(
    encoded, codec, dtype, shape, wire_dtypes, part_shapes, what, payloads, index
) -> list:
    """`check_encoded` with the codec described by names (no TensorFlow).

    Args:
      codec, dtype: the expected codec and decoded dtype names.
      shape: the expected decoded shape (None entries match any size), or
        None for any shape.
      wire_dtypes: the dtype names of the parts the codec sends.
      part_shapes: `part_shapes(decoded shape)` -> the parts' exact shapes.
      The other arguments as `check_encoded`.
    """
    if encoded.codec != codec:
        raise WireError(
            f"{what}: encoded with codec {encoded.codec!r}, this party expects "
            f"{codec!r}"
        )
    if encoded.dtype != dtype:
        raise WireError(f"{what}: dtype {encoded.dtype!r}, expected {dtype!r}")
    got = list(encoded.shape)
    if shape is not None and (
        len(got) != len(shape)
        or any(e is not None and g != e for g, e in zip(got, shape))
    ):
        expected = ["batch" if e is None else e for e in shape]
        raise WireError(f"{what}: shape {got}, expected {expected}")
    if any(d < 0 for d in got):
        raise WireError(f"{what}: negative dimension in shape {got}")
    if len(encoded.parts) != len(wire_dtypes):
        raise WireError(
            f"{what}: {len(encoded.parts)} wire parts, codec {codec!r} "
            f"sends {len(wire_dtypes)}"
        )
    parts = []
    for i, (part, wire_dtype) in enumerate(zip(encoded.parts, wire_dtypes)):
        if part.dtype != wire_dtype:
            raise WireError(
                f"{what}: wire part {i} has dtype {part.dtype!r}, codec "
                f"{codec!r} sends {wire_dtype!r}"
            )
        name = f"{what} part {i}"
        if payloads is None:
            parts.append(from_array(part, name))
        else:
            parts.append(payloads.array(part, ("tensors", index, i), name))
    for i, (part, want) in enumerate(zip(parts, part_shapes(got))):
        if list(part.shape) != want:
            raise WireError(
                f"{what}: wire part {i} has shape {list(part.shape)}, codec "
                f"{codec!r} sends {want} for a tensor of shape {got}"
            )
    return parts


def _part_shapes(codec, dtype, shape) -> list:
    """The exact shapes of the parts `codec` sends for a tensor of `shape`.

    Checked before decoding, so a small message cannot decode (or broadcast)
    into a huge tensor.
    """
    from splitkeras.transport.codec import CastCodec, Int8Codec, TopKCodec

    if not dtype.is_floating or isinstance(codec, CastCodec):
        return [shape]
    if isinstance(codec, Int8Codec):
        return [shape, [shape[-1]] if codec.per_channel else []]
    if isinstance(codec, TopKCodec):
        size = math.prod(shape)
        k = min(max(1, math.ceil(codec.fraction * size)), size)
        return [[k], [k]]
    raise WireError(f"codec {codec.name!r} has no wire-shape rule")


def decode_tensor(codec, encoded, parts, what):
    """Decodes checked `parts`; `WireError` if they do not fit or are not finite."""
    import tensorflow as tf

    dtype = tf.as_dtype(encoded.dtype)
    if getattr(codec, "wire_dtype", None) == dtype:
        # A float32 (or float16 to float16) cast codec: the part is the
        # tensor. Checked in numpy, one op fewer per check on a busy host.
        (part,) = parts
        array = np.asarray(part).reshape(list(encoded.shape))
        if dtype.is_floating and not np.isfinite(array).all():
            raise WireError(f"{what}: has non-finite values (NaN or Inf)")
        return tf.constant(array)
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


def control_envelope(message: Message, to: str = "") -> wire_pb2.Envelope:
    """The envelope of an orchestration message's fields (no tensors)."""
    envelope = wire_pb2.Envelope(
        kind=int(message.kind),
        client_id=int(message.client_id),
        step=int(message.step),
        round=int(message.round),
        count=int(message.count),
        state=bytes(message.state or b""),
        status=int(message.status),
        to=to,
    )
    for name, value in (message.metrics or {}).items():
        envelope.metrics[name] = float(value)
    return envelope


def control_message(envelope: wire_pb2.Envelope, **fields) -> Message:
    """The `Message` of an envelope's orchestration fields, checked.

    Raises:
      WireError: an unknown kind or status, or a metric that is not finite.
    """
    try:
        kind, status = Kind(envelope.kind), Status(envelope.status)
    except ValueError:
        raise WireError(
            f"unknown message kind {envelope.kind} or status {envelope.status}"
        ) from None
    metrics = dict(envelope.metrics)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise WireError(f"metrics {bad} are not finite")
    return Message(
        kind=kind,
        client_id=envelope.client_id,
        step=envelope.step,
        round=envelope.round,
        count=envelope.count,
        state=envelope.state,
        metrics=metrics or None,
        status=status,
        **fields,
    )
