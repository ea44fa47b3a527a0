"""SavedModel -> LiteRT (TFLite) flatbuffers, builtin ops only.

The full model (every signature, training included) converts with resource
variables enabled and the builtin op set only: a device runs it with the
`ai-edge-litert` interpreter alone, without the Flex delegate (which would
bring TensorFlow's kernels along). Quantized variants hold only the `serve`
signature: weights in float16, or dynamic-range int8 (int8 weights, float
activations); training updates float weights, so it stays float32.
"""

from __future__ import annotations

import re

import tensorflow as tf

__all__ = ["QUANTIZATIONS", "LiteConversionError", "to_litert"]

QUANTIZATIONS = ("float16", "int8")


class LiteConversionError(ValueError):
    """The segment has ops LiteRT's builtin set cannot run."""


def _converter(saved_model_dir, signature_keys):
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=list(signature_keys)
    )
    converter.experimental_enable_resource_variables = True
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def to_litert(saved_model_dir: str, signature_keys, quantize: str | None = None):
    """The LiteRT flatbuffer (bytes) of `signature_keys` of a SavedModel.

    Args:
      saved_model_dir: a SavedModel written by `splitkeras.export`.
      signature_keys: the signatures to convert (all of them for training).
      quantize: None (float32), "float16" (float16 weights) or "int8"
        (dynamic-range: int8 weights, float activations).

    Raises:
      LiteConversionError: an op has no LiteRT builtin kernel; the message
        names the ops (e.g. a layer whose training gradient LiteRT lacks:
        export with training=False for inference only).
    """
    converter = _converter(saved_model_dir, signature_keys)
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise ValueError(
                f"unknown quantization {quantize!r}; choose one of "
                f"{', '.join(QUANTIZATIONS)} (or None for float32)"
            )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
    try:
        return converter.convert()
    except Exception as e:  # the converter raises its own ConverterError
        ops = re.search(r"TF Select ops: ([^\n]*)", str(e))
        if ops is None:
            raise  # not a missing kernel: the converter's own error
        raise LiteConversionError(
            f"signatures {', '.join(signature_keys)} of {saved_model_dir} use ops "
            f"that LiteRT has no builtin kernel for: {ops.group(1)}. Layers whose "
            "training gradients LiteRT lacks can still be exported for "
            "inference (training=False)."
        ) from e
