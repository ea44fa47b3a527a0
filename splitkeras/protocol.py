"""The messages split-learning parties exchange.

Only what crosses a cut travels during a step: cut tensors going up, their
gradients coming back, and (U-shaped) the server's outputs and their
gradients. Labels travel only where the receiving party holds the loss.
Between steps the schedule moves what its configuration needs, also as
messages: turns and the client state handed from one client to the next
(round robin), client weights and their average (SplitFed, FedAvg),
gradients and the model (large-batch SGD), blinded sample ids (vertical).
Every message names the client and the step or round it belongs to, so a
transport can order, deduplicate, authenticate and count it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

__all__ = ["DATA_KINDS", "Kind", "Message", "NotYet", "Rejected", "Status"]


class Kind(enum.IntEnum):
    """What a message carries."""

    TRAIN = 1  # client -> server: cut tensors (+ labels when vanilla)
    GRADIENTS = 2  # server -> client: d loss / d cut tensors
    SERVER_OUTPUT = 3  # server -> client: server outputs (U-shaped, predict)
    OUTPUT_GRADIENTS = 4  # client -> server: d loss / d server outputs
    EVALUATE = 5  # client -> server: cut tensors (+ labels), inference mode
    PREDICT = 6  # client -> server: cut tensors; server answers SERVER_OUTPUT
    ACK = 7  # the other side took the message (evaluation: carries the loss)
    # Orchestration: who trains when, and what moves between rounds.
    BEGIN = 8  # client -> coordinator: begin my part of a round; the reply
    # says whether it may (status) and carries the handed-on state
    END = 9  # client -> coordinator: my part of the round is done (its
    # state for the next client, metrics)
    HANDOFF = 10  # client -> next client: its sealed state (peer handoff)
    WEIGHTS = 11  # client -> averager: its weights and example count; also
    # the averager's answer to FETCH (the average, or the model)
    FETCH = 12  # client -> averager: the average (or model) of a round
    UPDATE = 13  # client -> server: gradients and statistics (large-batch SGD)
    REPORT = 14  # evaluating client -> coordinator: a round's test metrics
    PSI = 15  # party <-> server: blinded sample ids (vertical alignment)


# Kinds of a training or inference step (cut tensors and their gradients).
DATA_KINDS = (
    Kind.TRAIN,
    Kind.GRADIENTS,
    Kind.SERVER_OUTPUT,
    Kind.OUTPUT_GRADIENTS,
    Kind.EVALUATE,
    Kind.PREDICT,
)


class Status(enum.IntEnum):
    """The answer to BEGIN or FETCH."""

    READY = 0  # go on (the reply carries what was asked for)
    WAIT = 1  # not yet: ask again (another client's turn, a barrier)
    PASSED = 2  # that round or turn is over (skipped): go to the next one
    DONE = 3  # the run has finished


class Rejected(Exception):
    """A party refuses a message; nothing changed.

    `reason` says what the sender should do: "invalid" (the message is
    malformed: fix it), "restart" (the receiver rolled back or the turn is
    over: begin the round or turn again), "denied" (not this sender's to
    send). A gRPC host answers with the matching status code.
    """

    REASONS = ("invalid", "restart", "denied")

    def __init__(self, reason: str, details: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(details)
        self.reason = reason
        self.details = details


class NotYet(Exception):
    """A party cannot answer this message until others have sent theirs
    (a barrier, or another client's slot); the sender's host waits and asks
    again."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One message between two parties.

    Attributes:
      kind: what the message carries.
      client_id: the client the message comes from or goes to.
      step: the training step it belongs to (an int or a scalar tensor).
      tensors: cut tensors, gradients, outputs or weights, in a fixed order.
      labels: the labels (where the receiver holds the loss).
      sample_weight: per-example weights travelling with the labels.
      loss: the loss computed by the label holder, reported back.
      ids: row numbers of the batch in the aligned data (vertical), never
        the parties' own sample ids.
      round: the round (epoch) an orchestration message belongs to.
      count: examples (WEIGHTS, UPDATE) or batches (BEGIN) behind it.
      state: a sealed client state (BEGIN reply, END, HANDOFF), or other
        opaque bytes (PSI).
      metrics: a party's figures (END, REPORT), name -> float.
      status: the answer to BEGIN or FETCH.
      offset: a micro-batch's first row in its step's batch (TRAIN).
      rows: the rows of the step's whole batch when the step travels as
        micro-batches (`config.train.microbatches`), else 0. The receiver
        accumulates the micro-batches' gradients and applies one update,
        with the last one (`offset` + its rows = `rows`).
    """

    kind: Kind
    client_id: int
    step: Any = 0
    tensors: tuple = ()
    labels: Any = None
    sample_weight: Any = None
    loss: Any = None
    ids: Any = None
    round: int = 0
    count: int = 0
    state: bytes = b""
    metrics: dict | None = None
    status: Status = Status.READY
    offset: Any = 0
    rows: Any = 0

    def replace(self, **changes) -> Message:
        return dataclasses.replace(self, **changes)

    def answer(self, kind: Kind, tensors=(), loss=None) -> Message:
        """A step's reply to this message: `kind`, `tensors`, `loss`, to
        the same client and step."""
        return Message(
            kind=kind,
            client_id=self.client_id,
            step=self.step,
            tensors=tuple(tensors),
            loss=loss,
        )

    def payload(self) -> list:
        """All tensors the message carries, in a fixed order."""
        extra = (self.labels, self.sample_weight, self.loss, self.ids)
        return list(self.tensors) + [t for t in extra if t is not None]


def flat(tensors) -> tuple:
    """A segment's input or output (one tensor or a list) as a tuple."""
    import tensorflow as tf  # the messages themselves need no TensorFlow

    return tuple(tf.nest.flatten(tensors))
