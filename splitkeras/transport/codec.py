"""How cut tensors are represented on the wire.

A codec turns a float tensor into the tensors that travel (its wire parts)
and back. It runs inside the compiled step (TensorFlow ops only), so the
in-process transport applies exactly what a network transport would.

- "float32", "float16", "bfloat16": one part, a cast.
- "int8": symmetric linear quantization, parts (q int8, scale float32 []):
  scale = max|x| / 127, q = round(x / scale); decoded q * scale is within
  scale / 2 of x.
- "int8_channel": the same with one scale per channel of the last axis
  (scale float32 [C]).
- "topk:F" (bare "topk": F = 0.1): the k = max(1, ceil(F * size)) entries of
  the whole tensor with the largest |x|, parts (values float32 [k], indices
  int32 [k] into the flattened tensor); the others decode as zeros.

Non-floating tensors (labels, ids) travel unchanged as one part with every
codec. Encoding and decoding have no gradient of their own: the receiving
party tapes over the decoded tensor.
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = ["CODECS", "Codec", "as_pair", "codec_pair", "get_codec"]

_INT8_MAX = 127.0
_TOPK_DEFAULT = 0.1


class Codec:
    """A wire format: `encode` to parts, `decode` back, `wire_dtypes` to declare.

    Subclasses implement the floating case (`_encode`, `_decode`,
    `_wire_dtypes`); non-floating tensors pass through as one part.
    """

    name: str

    def encode(self, tensor: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The wire parts of `tensor`."""
        tensor = tf.convert_to_tensor(tensor)
        if not tensor.dtype.is_floating:
            return (tensor,)
        return tuple(self._encode(tensor))

    def decode(self, parts, dtype, shape) -> tf.Tensor:
        """The tensor of `dtype` and `shape` (tensor or TensorShape) `parts` encode."""
        dtype = tf.as_dtype(dtype)
        parts = tuple(parts)
        if len(parts) != len(self.wire_dtypes(dtype)):
            raise ValueError(
                f"codec {self.name!r} decodes {len(self.wire_dtypes(dtype))} wire "
                f"part(s) for {dtype.name}, got {len(parts)}"
            )
        if not dtype.is_floating:
            (wire,) = parts
            return wire if wire.dtype == dtype else tf.cast(wire, dtype)
        return self._decode(parts, dtype, shape)

    def wire_dtypes(self, dtype) -> tuple[tf.DType, ...]:
        """The dtypes of the parts `encode` makes of a tensor of `dtype`."""
        dtype = tf.as_dtype(dtype)
        if not dtype.is_floating:
            return (dtype,)
        return self._wire_dtypes(dtype)

    def _encode(self, tensor):
        raise NotImplementedError

    def _decode(self, parts, dtype, shape):
        raise NotImplementedError

    def _wire_dtypes(self, dtype):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"


class CastCodec(Codec):
    """Casts float tensors to `wire_dtype` for the trip and back on arrival."""

    def __init__(self, name: str, wire_dtype: tf.DType):
        self.name = name
        self.wire_dtype = wire_dtype

    def _encode(self, tensor):
        if tensor.dtype == self.wire_dtype:
            return (tensor,)
        return (tf.cast(tensor, self.wire_dtype),)

    def _decode(self, parts, dtype, shape):
        del shape
        (wire,) = parts
        return wire if wire.dtype == dtype else tf.cast(wire, dtype)

    def _wire_dtypes(self, dtype):
        return (self.wire_dtype,)


class Int8Codec(Codec):
    """Symmetric int8 quantization, one float32 scale per tensor or channel.

    scale = max|x| / 127 (1 where max|x| is 0, so zeros stay exact), q =
    round(x / scale) clipped to [-127, 127]; per channel, the max runs over
    every axis but the last and the scale has shape [C].
    """

    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel
        self.name = "int8_channel" if per_channel else "int8"

    def _encode(self, tensor):
        x = tf.cast(tensor, tf.float32)
        if self.per_channel:
            if x.shape.rank == 0:
                raise ValueError("codec 'int8_channel' needs a tensor of rank >= 1")
            flat = tf.reshape(tf.abs(x), [-1, tf.shape(x)[-1]])
            peak = tf.reduce_max(flat, axis=0)  # [C]; -max_float if no rows
        else:
            peak = tf.reduce_max(tf.abs(x))
        scale = tf.where(peak > 0, peak / _INT8_MAX, tf.ones_like(peak))
        q = tf.clip_by_value(tf.round(x / scale), -_INT8_MAX, _INT8_MAX)
        return tf.cast(q, tf.int8), scale

    def _decode(self, parts, dtype, shape):
        del shape
        q, scale = parts
        return tf.cast(tf.cast(q, tf.float32) * scale, dtype)

    def _wire_dtypes(self, dtype):
        return (tf.int8, tf.float32)


class TopKCodec(Codec):
    """Keeps the k = max(1, ceil(fraction * size)) largest |x| of the tensor.

    Parts: values (float32 [k]) and their indices into the flattened tensor
    (int32 [k]); decoding scatters them into zeros of the tensor's shape.
    """

    def __init__(self, fraction: float = _TOPK_DEFAULT):
        self.fraction = _check_fraction(fraction)
        self.name = f"topk:{self.fraction!r}"

    def _encode(self, tensor):
        flat = tf.reshape(tf.cast(tensor, tf.float32), [-1])
        size = tf.size(flat)
        k = tf.cast(tf.math.ceil(self.fraction * tf.cast(size, tf.float64)), tf.int32)
        k = tf.minimum(tf.maximum(k, 1), size)
        _, indices = tf.math.top_k(tf.abs(flat), k=k, sorted=False)
        return tf.gather(flat, indices), tf.cast(indices, tf.int32)

    def _decode(self, parts, dtype, shape):
        values, indices = parts
        shape = _shape_tensor(shape, self.name)
        dense = tf.scatter_nd(
            tf.expand_dims(tf.cast(indices, tf.int64), -1),
            tf.cast(values, tf.float32),
            tf.reshape(tf.reduce_prod(shape), [1]),
        )
        return tf.cast(tf.reshape(dense, shape), dtype)

    def _wire_dtypes(self, dtype):
        return (tf.float32, tf.int32)


def _check_fraction(fraction) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(
            f"top-k keep fraction must be a number in (0, 1], got {fraction!r} "
            "(e.g. 'topk:0.1' keeps the 10% largest |x|)"
        )
    return value


def _shape_tensor(shape, codec_name) -> tf.Tensor:
    """`shape` (TensorShape, list or tensor) as an int64 vector."""
    if isinstance(shape, tf.TensorShape):
        if not shape.is_fully_defined():
            raise ValueError(
                f"codec {codec_name!r} decodes to a full shape, got {shape} "
                "(pass tf.shape(tensor) for a dynamic batch)"
            )
        shape = shape.as_list()
    return tf.cast(tf.convert_to_tensor(shape, dtype_hint=tf.int64), tf.int64)


CODECS = {
    "float32": CastCodec("float32", tf.float32),
    "float16": CastCodec("float16", tf.float16),
    "bfloat16": CastCodec("bfloat16", tf.bfloat16),
    "int8": Int8Codec(per_channel=False),
    "int8_channel": Int8Codec(per_channel=True),
    "topk": TopKCodec(_TOPK_DEFAULT),
}


def get_codec(name: str | Codec) -> Codec:
    """Returns the codec called `name` (or `name` itself if a Codec).

    Names: the keys of `CODECS`, or "topk:F" with a keep fraction F in (0, 1].
    """
    if isinstance(name, Codec):
        return name
    if isinstance(name, str) and name.startswith("topk:"):
        return TopKCodec(name[len("topk:") :])
    if not isinstance(name, str) or name not in CODECS:
        raise ValueError(
            f"unknown codec {name!r}; available codecs: {', '.join(CODECS)}, "
            "topk:<fraction in (0, 1]>"
        )
    return CODECS[name]


def as_pair(codec) -> tuple:
    """(up, down) from one codec (both directions) or an (up, down) pair."""
    if isinstance(codec, str | Codec):
        return codec, codec
    pair = tuple(codec)
    if len(pair) != 2:
        raise ValueError(f"codec must be one name or an (up, down) pair, got {codec!r}")
    return pair


def codec_pair(config) -> tuple[str, str]:
    """(activations codec, gradients codec) from `config.transport`.

    `transport.codec` is the default of both directions;
    `transport.activation_codec` / `transport.gradient_codec` override it
    when not empty. The names are checked and canonical ("topk" ->
    "topk:0.1"), so two parties can compare them.
    """
    transport = config.transport
    default = transport.codec
    up = transport.get("activation_codec", "") or default
    down = transport.get("gradient_codec", "") or default
    return get_codec(up).name, get_codec(down).name
