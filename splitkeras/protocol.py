"""The messages split-learning parties exchange.

Only what crosses a cut travels: cut tensors going up, their gradients coming
back, and (U-shaped) the server's outputs and their gradients. Labels travel
only in the vanilla configuration, where the server holds the loss. Every
message names the step and the client it belongs to, so that a transport can
order, deduplicate and authenticate it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

__all__ = ["Kind", "Message"]


class Kind(enum.IntEnum):
    """What a message carries."""

    TRAIN = 1  # client -> server: cut tensors (+ labels when vanilla)
    GRADIENTS = 2  # server -> client: d loss / d cut tensors
    SERVER_OUTPUT = 3  # server -> client: server outputs (U-shaped, predict)
    OUTPUT_GRADIENTS = 4  # client -> server: d loss / d server outputs
    EVALUATE = 5  # client -> server: cut tensors (+ labels), inference mode
    PREDICT = 6  # client -> server: cut tensors; server answers SERVER_OUTPUT
    ACK = 7  # server -> client: evaluation done (vanilla), carries the loss


@dataclasses.dataclass(frozen=True)
class Message:
    """One message between two parties.

    Attributes:
      kind: what the message carries.
      client_id: the client the message comes from or goes to.
      step: the training step it belongs to (an int or a scalar tensor).
      tensors: the cut tensors, gradients or outputs, in graph order.
      labels: the labels (vanilla only: labels never leave a U-shaped client).
      sample_weight: per-example weights travelling with the labels.
      loss: the loss computed by the label holder, reported back.
      ids: sample ids of the batch, for aligning vertically partitioned data.
    """

    kind: Kind
    client_id: int
    step: Any
    tensors: tuple = ()
    labels: Any = None
    sample_weight: Any = None
    loss: Any = None
    ids: Any = None

    def replace(self, **changes) -> Message:
        return dataclasses.replace(self, **changes)

    def payload(self) -> list:
        """All tensors the message carries, in a fixed order."""
        extra = (self.labels, self.sample_weight, self.loss, self.ids)
        return list(self.tensors) + [t for t in extra if t is not None]


def flat(tensors) -> tuple:
    """A segment's input or output (one tensor or a list) as a tuple."""
    import tensorflow as tf  # the messages themselves need no TensorFlow

    return tuple(tf.nest.flatten(tensors))
