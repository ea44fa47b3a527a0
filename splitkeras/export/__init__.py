"""Client segments to devices: SavedModel and LiteRT export.

`export_segment(segment, optimizer, out_dir)` writes

- `saved_model/`: the segment with the signatures serve, forward, backward,
  save and restore (`splitkeras.export.module`), dynamic batch;
- `client.tflite`: the same signatures in LiteRT, builtin ops only, so the
  `ai-edge-litert` interpreter runs and trains it without TensorFlow
  (`splitkeras.edge`);
- `serve_saved_model/`: the `serve` signature alone, weights frozen into
  constants (inference);
- `client_serve_float16.tflite`, `client_serve_int8.tflite`: that with
  float16 or dynamic-range int8 weights;
- `export.json`: each artifact's size and its largest output difference
  from the Keras segment on a sample batch.

`export_from_workdir(config, workdir, out_dir)` does this for a trained
client (and writes the server segment's SavedModel and the `edge.json` a
device needs to join a run). `scripts/export_client.py` is its command line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from splitkeras.edge.runtime import LiteSegment
from splitkeras.export.litert import QUANTIZATIONS, LiteConversionError, to_litert
from splitkeras.export.module import SIGNATURES, TrainableSegment
from splitkeras.parties.segment_step import wire_dtype

__all__ = [
    "LiteConversionError",
    "QUANTIZATIONS",
    "SIGNATURES",
    "TrainableSegment",
    "export_from_workdir",
    "export_segment",
    "export_server_segment",
    "to_litert",
]

_SAVE_OPTIONS = tf.saved_model.SaveOptions(
    # The backward signature already holds its gradients; saving TensorFlow's
    # gradient functions of the overridden ops is neither needed nor possible.
    experimental_custom_gradients=False
)


def _sample(segment, sample, batch=8, seed=0):
    if sample is not None:
        return np.asarray(sample, np.float32)
    shape = [batch, *segment.inputs[0].shape[1:]]
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b)
    )


def export_segment(
    segment,
    optimizer,
    out_dir: str,
    *,
    training: bool = True,
    quantize=QUANTIZATIONS,
    sample=None,
) -> dict:
    """Exports a client segment; returns the report also written to export.json.

    Args:
      segment: the client's Keras segment (one input).
      optimizer: its optimizer (its state is exported with it); built here
        if it is not.
      out_dir: where to write (see the module docstring).
      training: export the training signatures too (else `serve` only).
      quantize: the quantized `serve` variants to write ("float16", "int8").
      sample: a batch of inputs to compare outputs on (None: uniform noise).

    Raises:
      LiteConversionError: the segment has ops without a LiteRT builtin.
    """
    tf.io.gfile.makedirs(out_dir)
    module = TrainableSegment(segment, optimizer)
    signatures = module.signatures()
    keys = SIGNATURES if training else ("serve",)
    saved_dir = os.path.join(out_dir, "saved_model")
    tf.saved_model.save(
        module, saved_dir, {k: signatures[k] for k in keys}, options=_SAVE_OPTIONS
    )
    serve_dir = _save_frozen_serve(module, os.path.join(out_dir, "serve_saved_model"))
    x = _sample(segment, sample)
    reference = [t.numpy() for t in tf.nest.flatten(segment(x, training=False))]
    loaded = tf.saved_model.load(saved_dir)
    outputs = loaded.signatures["serve"](x=tf.constant(x))
    saved = [outputs[f"cut_{i}"].numpy() for i in range(len(reference))]
    report = {
        "signatures": list(keys),
        "input_shape": [None, *segment.inputs[0].shape[1:]],
        "cut_shapes": [[None, *t.shape[1:]] for t in segment.outputs],
        "parameters": int(sum(np.prod(v.shape) for v in segment.trainable_variables)),
        "sample_batch": int(x.shape[0]),
        "artifacts": {
            "saved_model": {
                "bytes": _directory_bytes(saved_dir),
                "max_abs_diff": _max_diff(saved, reference),
            }
        },
    }
    # Training needs the variables; inference converts the frozen weights
    # (which is also what lets the quantizer see them).
    variants = [("client.tflite", saved_dir if training else serve_dir, keys, None)]
    variants += [
        (f"client_serve_{q}.tflite", serve_dir, ("serve",), q) for q in quantize
    ]
    for name, source, variant_keys, quantization in variants:
        blob = to_litert(source, variant_keys, quantization)
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(blob)
        lite = LiteSegment(path).serve(x)
        report["artifacts"][name] = {
            "bytes": len(blob),
            "quantization": quantization or "none",
            "signatures": list(variant_keys),
            "max_abs_diff": _max_diff(lite, reference),
        }
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _save_frozen_serve(module, path) -> str:
    """`module`'s serve signature with its variables frozen into constants."""
    frozen = convert_variables_to_constants_v2(module.infer.get_concrete_function())

    def serve(x):
        outputs = tf.nest.flatten(frozen(x))
        return {f"cut_{i}": t for i, t in enumerate(outputs)}

    holder = tf.Module()
    holder.infer = tf.function(serve, input_signature=[module.input_spec])
    tf.saved_model.save(holder, path, {"serve": holder.infer.get_concrete_function()})
    return path


class _ServerModule(tf.Module):
    def __init__(self, segment):
        super().__init__(name="splitkeras_server")
        self.segment = segment
        specs = [  # 16-bit cut tensors arrive in float32 (wire_dtype)
            tf.TensorSpec([None, *t.shape[1:]], wire_dtype(t.dtype), f"cut_{i}")
            for i, t in enumerate(segment.inputs)
        ]
        self.infer = tf.function(self._serve, input_signature=[specs])

    def _serve(self, cuts):
        inputs = cuts[0] if len(cuts) == 1 else list(cuts)
        outputs = tf.nest.flatten(self.segment(inputs, training=False))
        return {f"output_{i}": t for i, t in enumerate(outputs)}


def export_server_segment(segment, out_dir: str) -> str:
    """The server segment as a SavedModel: `serve(cut_0..) -> output_0..`."""
    module = _ServerModule(segment)
    path = os.path.join(out_dir, "server_saved_model")
    tf.saved_model.save(module, path, {"serve": module.infer.get_concrete_function()})
    return path


def _directory_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def export_from_workdir(
    config, workdir: str, out_dir: str, client_id: int = 0, **kwargs
) -> dict:
    """Exports client `client_id` of a trained run (and its server segment).

    `workdir` is a `scripts/train.py` run (party checkpoints under
    `checkpoints/`) or a gRPC client's workdir (`client.weights.h5`; the
    optimizer then starts fresh). Writes `edge.json` next to the model:
    what a device needs to join the run (`splitkeras.edge`).
    """
    from splitkeras import data as data_lib
    from splitkeras import experiment
    from splitkeras.edge.spec import EdgeSpec

    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    segments = experiment.build_segments(config, arrays)
    training = kwargs.pop("training", not segments.ushaped)
    if training and segments.ushaped:
        raise ValueError(
            "on-device training exports a vanilla client; a U-shaped client also "
            "trains its tail: export it with training=False (inference)"
        )
    optimizer = experiment._optimizer(config)
    optimizer.build(segments.client.trainable_variables)
    restored = _restore(workdir, segments, optimizer, client_id)
    sample = arrays.x_test[: kwargs.pop("sample_size", 8)]
    if sample.dtype == np.uint8:
        sample = sample.astype(np.float32) / np.float32(255.0)
    report = export_segment(
        segments.client, optimizer, out_dir, training=training, sample=sample, **kwargs
    )
    export_server_segment(segments.server, out_dir)
    report["restored_from"] = restored
    spec = EdgeSpec.from_config(config, segments, client_id)
    spec.write(os.path.join(out_dir, "edge.json"))
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _restore(workdir, segments, optimizer, client_id) -> dict:
    """Loads the trained client (and, if there, server) segments of `workdir`."""
    from splitkeras.checkpointing import load_trained

    restored = {
        "client": load_trained(
            [segments.client, segments.tail],
            workdir,
            f"client_{client_id}",
            "client.weights.h5",
            optimizer,
        )
    }
    try:
        restored["server"] = load_trained(
            [segments.server], workdir, "server", "server.weights.h5"
        )
    except FileNotFoundError:
        pass  # a client's own workdir holds no server
    return restored
