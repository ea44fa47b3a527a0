"""How cut tensors are represented on the wire.

A codec turns a float tensor into the tensors that travel and back. It runs
inside the compiled step (TensorFlow ops only), so the in-process transport
applies exactly what a network transport would.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["Codec", "get_codec", "CODECS"]


class Codec:
    """Casts float tensors to `wire_dtype` for the trip and back on arrival."""

    def __init__(self, name: str, wire_dtype: tf.DType):
        self.name = name
        self.wire_dtype = wire_dtype

    def encode(self, tensor: tf.Tensor) -> tf.Tensor:
        if not tensor.dtype.is_floating or tensor.dtype == self.wire_dtype:
            return tensor
        return tf.cast(tensor, self.wire_dtype)

    def decode(self, wire: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
        return wire if wire.dtype == dtype else tf.cast(wire, dtype)

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"


CODECS = {
    "float32": Codec("float32", tf.float32),
    "float16": Codec("float16", tf.float16),
    "bfloat16": Codec("bfloat16", tf.bfloat16),
}


def get_codec(name: str | Codec) -> Codec:
    """Returns the codec called `name` (or `name` itself if a Codec)."""
    if isinstance(name, Codec):
        return name
    if name not in CODECS:
        raise ValueError(
            f"unknown codec {name!r}; available codecs: {', '.join(CODECS)}"
        )
    return CODECS[name]
