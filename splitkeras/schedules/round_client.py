"""A client's part of a round, over one link: begin, train, end, evaluate.

The program of a client in a process of its own wherever a round is every
client's steps on one link: vertical (each feature holder sends its cut
tensor and the batch's row numbers; the label owner also the labels) and
multi-hop (the client talks to the first relay). It begins the round with
the coordinator (BEGIN, after the last round ended), trains one
`Client.train_step` per batch, ends the round (END), and, as the evaluating
client, sends the test batches and reports (REPORT). A party that measures
its leakage (a vertical party without the labels) keeps its figures.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras.parties.client import Client
from splitkeras.parties.segment_step import compiled
from splitkeras.protocol import Kind, Message

__all__ = ["RoundClient"]


class RoundClient:
    """One client's rounds over `link`.

    Args:
      client: the `Client` party.
      link: to the party it sends its steps to (the coordinator's host, or
        the first relay, which passes BEGIN, END and REPORT on).
      sends_labels: this client holds the labels and sends them with its
        steps (vanilla: the party at the end of the link holds the loss).
      run_eagerly / jit_compile: how the steps are compiled.

    Batches are `(x, y)` or `(x, y, row numbers)` (vertical).
    """

    def __init__(
        self,
        client: Client,
        link,
        sends_labels=True,
        run_eagerly=False,
        jit_compile=False,
    ):
        self.client = client
        self.link = link
        self.sends_labels = sends_labels
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._eval_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_fn = compiled(self._train, run_eagerly, jit_compile)
        self.eval_fn = compiled(self._evaluate, run_eagerly, jit_compile)
        self.leakage = None

    @property
    def client_id(self) -> int:
        return self.client.client_id

    @property
    def steps(self) -> int:
        return int(self._step.numpy())

    def _train(self, x, y, ids=None):
        step = self._step.assign_add(1)
        y = y if self.sends_labels else None
        return self.client.train_step(self.link, step, x, y, ids=ids)

    def _evaluate(self, x, y, ids=None):
        step = self._eval_step.assign_add(1)
        y = y if self.sends_labels else None
        return self.client.evaluate_step(self.link, step, x, y, ids=ids)

    def _message(self, kind, epoch, **fields) -> Message:
        return Message(kind, self.client_id, self.steps, round=epoch, **fields)

    def begin(self, epoch: int, batches: int):
        """Begins round `epoch` (waits until the last one has ended)."""
        status = self.link.poll(self._message(Kind.BEGIN, epoch, count=batches))
        return status.status

    def train(self, epoch: int, dataset):
        """The round's steps (one yield each); then END."""
        examples = 0
        for batch in dataset:
            loss = self.train_fn(*batch)
            # A party without the labels does not learn the loss.
            yield loss if self.sends_labels else None
            examples += int(tf.nest.flatten(batch[0])[0].shape[0])
        self.link.request(self._message(Kind.END, epoch, count=examples))

    def finish(self, epoch: int, test=None, reports: bool = True) -> None:
        """Sends `test`'s batches for evaluation (if given); measures its
        leakage (the `leakage` hook, if set); the evaluating client
        (`reports`) then REPORTs (the label holder has the figures) with its
        leakage figures, and a party that does not report keeps them."""
        if test is None:
            return
        self._eval_step.assign(0)
        for batch in test:
            self.eval_fn(*batch)
        figures = self.leakage(self.client) if self.leakage else {}
        if reports:
            self.link.poll(self._message(Kind.REPORT, epoch, metrics=figures))
