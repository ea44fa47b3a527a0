"""Client segments to devices: SavedModel and LiteRT export.

`export_segment(segment, optimizer, out_dir)` writes

- `saved_model/`: the segment with the signatures serve, forward, backward,
  save, restore and init (`splitkeras.export.module`), dynamic batch; every
  SavedModel written here has `serve` as `serving_default` too (what TF
  Serving and `saved_model_cli` use when no signature is named);
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
client (or, with no workdir, the untrained one of the config's seed), writes
the server segment's SavedModel when the workdir holds the trained server,
and the `edge.json` a device needs to join the run.
`splitkeras export` is its command line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from splitkeras.edge.client import model_inputs
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
      ValueError: the segment computes in 16 bits (mixed precision), which
        LiteRT's builtin kernels do not: export a float32 build of it with
        the same weights (`export_from_workdir` does).
    """
    _check_float32(segment)
    tf.io.gfile.makedirs(out_dir)
    module = TrainableSegment(segment, optimizer)
    keys = SIGNATURES if training else ("serve",)
    saved_dir = os.path.join(out_dir, "saved_model")
    tf.saved_model.save(
        module, saved_dir, _serving(module.signatures(keys)), options=_SAVE_OPTIONS
    )
    serve_dir = _save_frozen_serve(module, os.path.join(out_dir, "serve_saved_model"))
    x = _sample(segment, sample)
    reference = _keras_outputs(segment, x)
    report = _report(segment, keys, x)
    report["artifacts"]["saved_model"] = {
        "bytes": _directory_bytes(saved_dir),
        "max_abs_diff": _max_diff(_saved_outputs(saved_dir, x), reference),
    }
    # Training needs the variables; inference converts the frozen weights
    # (which is also what lets the quantizer see them).
    variants = [("client.tflite", saved_dir if training else serve_dir, keys, None)]
    variants += [
        (f"client_serve_{q}.tflite", serve_dir, ("serve",), q) for q in quantize
    ]
    for name, source, variant_keys, quantization in variants:
        report["artifacts"][name] = _write_lite(
            out_dir, name, source, variant_keys, quantization, x, reference
        )
    _write_report(out_dir, report)
    return report


def _check_float32(segment) -> None:
    low = sorted({layer.compute_dtype for layer in segment.layers} - {"float32"})
    if low:
        raise ValueError(
            f"segment {segment.name!r} computes in {', '.join(low)} (mixed "
            "precision); LiteRT's builtin kernels compute in float32: export a "
            "float32 build of it with the same weights (export_from_workdir "
            "does, for inference)"
        )


def _keras_outputs(segment, x) -> list:
    """The segment's inference outputs, as they cross the cut (wire_dtype)."""
    outputs = tf.nest.flatten(segment(x, training=False))
    return [tf.cast(t, wire_dtype(t.dtype)).numpy() for t in outputs]


def _saved_outputs(saved_dir, x) -> list:
    serve = tf.saved_model.load(saved_dir).signatures["serve"]
    outputs = serve(x=tf.constant(x))
    return [outputs[f"cut_{i}"].numpy() for i in range(len(outputs))]


def _report(segment, keys, x) -> dict:
    return {
        "signatures": list(keys),
        "input_shape": [None, *segment.inputs[0].shape[1:]],
        "cut_shapes": [[None, *t.shape[1:]] for t in segment.outputs],
        "parameters": int(sum(np.prod(v.shape) for v in segment.trainable_variables)),
        "sample_batch": int(x.shape[0]),
        "artifacts": {},
    }


def _write_lite(out_dir, name, source, keys, quantization, x, reference) -> dict:
    """Converts `keys` of the SavedModel `source` to `out_dir/name`; its report."""
    blob = to_litert(source, keys, quantization)
    path = os.path.join(out_dir, name)
    with open(path, "wb") as f:
        f.write(blob)
    return {
        "bytes": len(blob),
        "quantization": quantization or "none",
        "signatures": list(keys),
        "max_abs_diff": _max_diff(LiteSegment(path).serve(x), reference),
    }


def _write_report(out_dir, report) -> None:
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(report, f, indent=2)


def _save_frozen_serve(module, path) -> str:
    """`module`'s serve signature with its variables frozen into constants."""
    frozen = convert_variables_to_constants_v2(module.infer.get_concrete_function())

    def serve(x):
        outputs = tf.nest.flatten(frozen(x))
        return {f"cut_{i}": t for i, t in enumerate(outputs)}

    holder = tf.Module()
    holder.infer = tf.function(serve, input_signature=[module.input_spec])
    tf.saved_model.save(
        holder, path, _serving({"serve": holder.infer.get_concrete_function()})
    )
    return path


def _serving(signatures: dict) -> dict:
    """`signatures` with `serve` also as `serving_default`, the key TF
    Serving and `saved_model_cli run` use when none is named."""
    return {**signatures, "serving_default": signatures["serve"]}


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
    tf.saved_model.save(
        module, path, _serving({"serve": module.infer.get_concrete_function()})
    )
    return path


def _directory_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def export_from_workdir(
    config,
    workdir: str | None,
    out_dir: str,
    client_id: int = 0,
    *,
    training: bool | None = None,
    quantize=QUANTIZATIONS,
    sample_size: int = 8,
) -> dict:
    """Exports client `client_id` of a run (and its server segment, if trained).

    Writes what `export_segment` writes, `edge.json` next to the model (what
    a device needs to join the run, `splitkeras.edge`) and, when `workdir`
    holds the trained server segment, `server_saved_model/`.

    Args:
      config: the run's config.
      workdir: a `splitkeras train` run (party checkpoints under
        `checkpoints/`: the client's optimizer state is exported too, the
        server segment as well) or a gRPC client's workdir
        (`client.weights.h5`; no server there, the optimizer starts fresh);
        None: the untrained segment of `config.seed`, as a run starts (what
        a device that trains from a run's first turn needs).
      out_dir: where to write.
      client_id: the client to export.
      training: export the on-device training signatures (None: for a
        vanilla float32 client at a constant learning rate; not for a
        U-shaped one, nor under mixed precision, whose clients scale their
        own loss, nor with a per-epoch learning-rate schedule).
      quantize: the quantized inference variants to write.
      sample_size: test examples (noise for streamed datasets) the exported
        outputs are compared with Keras's on.

    A mixed-precision run's client is exported as a float32 build with the
    trained weights (LiteRT computes in float32); its cut tensors cross in
    float32 as a Keras client's do.

    Returns:
      The report written to export.json: artifacts, `restored_from` and
      `server` (its SavedModel, or why it was not exported).

    Raises:
      FileNotFoundError: `workdir` holds no trained client.
      ValueError: the run cannot be exported this way (a U-shaped client
        with training, or what `EdgeSpec.from_config` refuses).
    """
    from splitkeras import builders
    from splitkeras.data.streaming import StreamingSource
    from splitkeras.edge.spec import EdgeSpec

    data = builders.load_data(config)  # a stream reads no examples here
    segments = builders.build_segments(config, data)
    precision = builders.precision(config)
    training = _check_training(training, segments, precision, config.train)
    spec = EdgeSpec.from_config(config, segments, client_id)  # before any file
    optimizer = builders.make_optimizer(config)
    optimizer.build(segments.client.trainable_variables)
    restored = (
        {} if workdir is None else _restore(workdir, segments, optimizer, client_id)
    )
    client = segments.client
    if precision:  # LiteRT computes in float32: the same weights, in float32
        float32 = config.copy_and_resolve_references()
        float32.train.mixed_precision = ""
        client = builders.build_segments(float32, data).client
        client.set_weights(segments.client.get_weights())
        optimizer = builders.make_optimizer(float32)  # inference: not exported
    if isinstance(data, StreamingSource):
        sample = _sample(client, None, batch=sample_size)
    else:
        sample = model_inputs(data.x_test[:sample_size])
    report = export_segment(
        client, optimizer, out_dir, training=training, quantize=quantize, sample=sample
    )
    report["mixed_precision"] = precision or None
    report["restored_from"] = restored
    report["server"], server_artifact = _export_server(
        segments, restored, workdir, sample, out_dir
    )
    if server_artifact is not None:
        report["artifacts"]["server_saved_model"] = server_artifact
    spec.write(os.path.join(out_dir, "edge.json"))
    _write_report(out_dir, report)
    return report


def _check_training(training, segments, precision, train) -> bool:
    """`training`, or its default; refuses what a device cannot train."""
    from splitkeras import learning_rate

    constant_rate = learning_rate.is_constant(train)
    if training is None:
        return not segments.ushaped and not precision and constant_rate
    if training and not constant_rate:
        raise ValueError(
            f"config.train.lr_schedule={train.lr_schedule!r} (warm-up "
            f"{train.warmup_epochs} epochs) changes the learning rate each epoch; "
            "an exported segment trains at one constant rate: export it with "
            "training=False (inference), or train this run with Keras clients"
        )
    if training and segments.ushaped:
        raise ValueError(
            "on-device training exports a vanilla client; a U-shaped client also "
            "trains its tail: export it with training=False (inference)"
        )
    if training and precision:
        raise ValueError(
            f"the run trains in {precision}: its clients compute in 16 bits and "
            "scale their own loss, which a LiteRT device does not; export it "
            "with training=False (inference, in float32)"
        )
    return bool(training)


def _export_server(segments, restored, workdir, sample, out_dir):
    """(status, artifact report or None) of the server segment's SavedModel.

    Only a trained server segment is exported (an untrained one would answer
    split inference with noise); its outputs are compared with Keras's on
    the client's cut tensors of `sample`.
    """
    if "server" not in restored:
        if workdir is None:
            reason = "an untrained export has no trained server segment"
        else:
            reason = f"{workdir} holds no trained server segment (a client's workdir)"
        return {"exported": False, "reason": reason}, None
    path = export_server_segment(segments.server, out_dir)
    cuts = tf.nest.flatten(segments.client(sample, training=False))
    inputs = cuts[0] if len(cuts) == 1 else cuts
    reference = tf.nest.flatten(segments.server(inputs, training=False))
    served = tf.saved_model.load(path).signatures["serve"](
        **{f"cut_{i}": tf.cast(c, wire_dtype(c.dtype)) for i, c in enumerate(cuts)}
    )
    outputs = [served[f"output_{i}"] for i in range(len(reference))]
    return {"exported": True, "path": path}, {
        "bytes": _directory_bytes(path),
        "max_abs_diff": _max_diff(
            outputs, [tf.cast(t, o.dtype) for t, o in zip(reference, outputs)]
        ),
    }


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
        pass  # a client's own workdir holds no server: _export_server says so
    return restored
