"""A party that owns one segment and the optimizer that trains it."""

from __future__ import annotations

import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint

__all__ = ["SegmentParty"]


class SegmentParty:
    """Base of the server-side parties (server, relay, vertical server).

    Subclasses set `self.segment` and `self.optimizer`.
    """

    segment = None
    optimizer = None

    @property
    def trainable_variables(self) -> list:
        return list(self.segment.trainable_variables)

    def build_optimizer(self):
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def checkpoint(self, **extra) -> tf.train.Checkpoint:
        """The party's own state: its segment and optimizer (+ `extra`)."""
        return party_checkpoint([self.segment], self.optimizer, **extra)
