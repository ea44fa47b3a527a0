"""Envelopes in and out of a host: every arriving message checked, then decoded.

A host turns each arriving `Envelope` into a `Message` for the party it is
addressed to, checking everything against what that party expects (the
specs of its inputs, whether it holds labels, the classes of its outputs,
what an orchestration message may carry) before anything is used, and
turns the party's reply back into an `Envelope`. Every refusal is a
`WireError` (INVALID_ARGUMENT) naming the problem.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from splitkeras.protocol import DATA_KINDS, Kind, Message
from splitkeras.transport import wire
from splitkeras.transport.proto import wire_pb2

__all__ = ["decode_message", "encode_reply"]

# What a client may send a host, by kind.
_SENT_BY_CLIENTS = (
    Kind.TRAIN,
    Kind.OUTPUT_GRADIENTS,
    Kind.EVALUATE,
    Kind.PREDICT,
    Kind.BEGIN,
    Kind.END,
    Kind.HANDOFF,
    Kind.WEIGHTS,
    Kind.FETCH,
    Kind.UPDATE,
    Kind.REPORT,
    Kind.PSI,
)
# Orchestration kinds that carry tensors (weights, gradients).
_WITH_TENSORS = (Kind.WEIGHTS, Kind.UPDATE)


def decode_message(envelope, party, client: int, payloads, codecs, specs=None):
    """The checked `Message` of `envelope` from `client`, for `party`.

    Args:
      envelope: the arrived `Envelope`.
      party: the receiving hosted party: `arrival_specs(kind, client)`,
        `takes_labels(client)` and `num_classes` tell what it takes.
      client: the authenticated sender.
      payloads: the body's out-of-line bytes (`wire.Payloads`).
      codecs: (activations codec, weights codec).
      specs: the [(dtype, shape)] the tensors must match (default: the
        party's `arrival_specs`).

    Returns:
      The `Message`.

    Raises:
      WireError: the message is malformed or not what `party` takes.
    """
    try:
        kind = Kind(envelope.kind)
    except ValueError:
        raise wire.WireError(
            f"unknown message kind {envelope.kind}: not a message of this protocol"
        ) from None
    if kind not in _SENT_BY_CLIENTS:
        raise wire.WireError(f"a client cannot send a {kind.name} message to a party")
    if kind not in DATA_KINDS:
        return _control(envelope, kind, party, client, payloads, codecs[1])
    if envelope.step < 1:
        raise wire.WireError(f"step id must be >= 1, got {envelope.step}")
    if specs is None:
        specs = party.arrival_specs(kind, client)
    tensors = _tensors(envelope, kind, specs, payloads, codecs[0])
    batch = int(tensors[0].shape[0]) if tensors else None
    if any(int(t.shape[0]) != batch for t in tensors):
        raise wire.WireError("tensors disagree on the batch size")
    if batch == 0:
        raise wire.WireError("tensor 0 has batch size 0: nothing to train on")
    labels = kind in (Kind.TRAIN, Kind.EVALUATE) and party.takes_labels(client)
    y, w = _labels(envelope, kind, labels, batch, party, payloads)
    ids = None
    if envelope.HasField("ids"):
        ids = payloads.array(envelope.ids, "ids", "ids")
        if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
            raise wire.WireError(
                f"ids must be {batch} integer row numbers, got {ids.dtype} "
                f"{list(ids.shape)}"
            )
        ids = tf.constant(ids, tf.int64)
    offset, rows = _piece(envelope, kind, batch)
    return Message(
        kind,
        client,
        int(envelope.step),
        tuple(tensors),
        y,
        w,
        ids=ids,
        offset=offset,
        rows=rows,
    )


def _piece(envelope, kind, batch) -> tuple:
    """(offset, rows) of a micro-batch of a TRAIN step, checked; (0, 0) for
    a whole batch."""
    offset, rows = int(envelope.offset), int(envelope.rows)
    if not rows:
        if offset:
            raise wire.WireError(f"offset {offset} without the step's rows")
        return 0, 0
    if kind != Kind.TRAIN:
        raise wire.WireError(f"{kind.name} messages are not sent as micro-batches")
    if offset < 0 or offset + batch > rows:
        raise wire.WireError(
            f"a micro-batch of {batch} rows at row {offset} does not fit in a "
            f"step of {rows} rows"
        )
    return offset, rows


def _tensors(envelope, kind, specs, payloads, codec) -> list:
    if len(envelope.tensors) != len(specs):
        raise wire.WireError(
            f"{kind.name} carries {len(envelope.tensors)} tensors, the server "
            f"expects {len(specs)}"
        )
    tensors = []
    for i, (encoded, (dtype, shape)) in enumerate(zip(envelope.tensors, specs)):
        what = f"tensor {i}"
        parts = wire.check_encoded(encoded, codec, dtype, shape, what, payloads, i)
        tensors.append(wire.decode_tensor(codec, encoded, parts, what))
    return tensors


def _labels(envelope, kind, wanted, batch, party, payloads):
    """(labels, sample weights) of a step message, checked."""
    if not wanted:
        if envelope.HasField("labels") or envelope.HasField("sample_weight"):
            raise wire.WireError(
                "this message must not carry labels: the receiver holds no "
                "loss here (U-shaped, or not the label owner) or the message is "
                "not for training"
            )
        return None, None
    if not envelope.HasField("labels"):
        raise wire.WireError(
            f"{kind.name} without labels, but this server holds the loss (vanilla)"
        )
    y = payloads.array(envelope.labels, "labels", "labels")
    _check_labels(y, batch, party.num_classes)
    w = None
    if envelope.HasField("sample_weight"):
        w = payloads.array(envelope.sample_weight, "sample_weight", "sample_weight")
        if w.shape != (batch,) or not np.all(np.isfinite(w)):
            raise wire.WireError(
                f"sample_weight must be {batch} finite values, got shape "
                f"{list(w.shape)}"
            )
        w = tf.constant(w, tf.float32)
    # One dtype per argument, so the compiled step is traced once.
    return tf.constant(y, tf.int64), w


def _check_labels(y, batch, classes):
    """Labels must be `batch` class ids of the receiver's classifier output."""
    if y.shape != (batch,):
        raise wire.WireError(
            f"labels have shape {list(y.shape)}, expected [{batch}] (one class "
            "id per example)"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise wire.WireError(f"labels must be integer class ids, got {y.dtype.name}")
    if classes and (y.min() < 0 or y.max() >= classes):
        raise wire.WireError(
            f"labels must be class ids in [0, {classes}), got [{y.min()}, {y.max()}]"
        )


def _control(envelope, kind, party, client, payloads, codec) -> Message:
    """An orchestration message: no labels; tensors only where weights travel."""
    for name in ("labels", "sample_weight", "loss", "ids"):
        if envelope.HasField(name):
            raise wire.WireError(f"a {kind.name} message must not carry {name}")
    tensors = ()
    if kind in _WITH_TENSORS:
        specs = party.arrival_specs(kind, client)
        tensors = tuple(_tensors(envelope, kind, specs, payloads, codec))
    elif len(envelope.tensors):
        raise wire.WireError(f"a {kind.name} message must not carry tensors")
    return wire.control_message(envelope, tensors=tensors)


def encode_reply(request, reply: Message, codecs, framed: bool) -> bytes:
    """The serialized reply envelope (a frame if the request was one).

    Args:
      request: the request `Envelope` (its client and step are echoed).
      reply: the party's reply `Message`.
      codecs: (gradients codec, weights codec).
      framed: answer with a frame (`wire.frame`).
    """
    if reply.kind in DATA_KINDS or reply.kind == Kind.ACK:
        envelope = wire_pb2.Envelope(
            kind=int(reply.kind),
            client_id=request.client_id,
            step=request.step,
            offset=request.offset,
        )
        codec = codecs[0]
    else:
        envelope = wire.control_envelope(reply)
        envelope.client_id, envelope.to = request.client_id, ""
        codec = codecs[1]
    if reply.kind == Kind.ACK:
        envelope.round, envelope.status = int(reply.round), int(reply.status)
        for name, value in (reply.metrics or {}).items():
            envelope.metrics[name] = float(value)
    payloads = [] if framed else None
    for t in reply.tensors:
        wire.encode_tensor(codec, t, envelope.tensors.add(), payloads)
    if reply.loss is not None:
        wire.fill_array(envelope.loss, tf.cast(reply.loss, tf.float32), payloads)
    if payloads is None:
        return envelope.SerializeToString()
    return wire.frame(envelope, payloads)
