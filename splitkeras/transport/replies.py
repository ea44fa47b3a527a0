"""Exactly once: a host's memory of the replies it sent.

Every training message carries its step id. A client that did not get its
reply (a lost connection, a deadline) sends the same step again; the host
answers it from `Replies` instead of applying it twice. The same memory
keeps a client's evaluation batches in order and knows which U-shaped
steps wait for their OUTPUT_GRADIENTS (and the outputs those gradients
must match).
"""

from __future__ import annotations

from splitkeras.protocol import DATA_KINDS, Kind

__all__ = ["TRAINING", "Replies"]

TRAINING = (Kind.TRAIN, Kind.OUTPUT_GRADIENTS)


class Replies:
    """The last replies per (party, client), by step id, kind and offset.

    Args:
      keep: how many training replies to keep per (party, client): a
        client with micro-batches and steps in flight may repeat any of
        them (`config.train.microbatches` x (`max_staleness` + 1)).
    """

    def __init__(self, keep: int = 1):
        self.keep = max(1, int(keep))
        # (party, client) -> {(step, kind, offset): reply bytes}, oldest first
        self._training = {}
        self._cache = {}  # ("eval", party, client) -> (step, kind, reply bytes)
        self._eval_step = {}  # (party, client) -> last evaluation batch
        self._open = {}  # (party, client) -> U-shaped outputs awaiting gradients
        self._pieces = {}  # (party, client) -> (step, end row, rows) answered last

    def clear(self) -> None:
        """Forgets everything (a rollback: the steps are trained again)."""
        self._training.clear()
        self._cache.clear()
        self._open.clear()
        self._eval_step.clear()
        self._pieces.clear()

    def cached(self, name, client, envelope):
        """The reply already sent for this very message, or None."""
        if envelope.kind in TRAINING:
            replies = self._training.get((name, client), {})
            return replies.get((envelope.step, envelope.kind, envelope.offset))
        cached = self._cache.get(("eval", name, client))
        if cached and cached[:2] == (envelope.step, envelope.kind):
            return cached[2]
        return None

    def step_rows(self, name, client, step):
        """The rows of `step` as its micro-batches answered so far say, or
        None (none answered, or the step is complete)."""
        last = self._pieces.get((name, client))
        if last is None or last[0] != step or last[1] >= last[2]:
            return None
        return last[2]

    def next_offset(self, name, client, step) -> int:
        """The first row of the micro-batch of `step` to answer next: a step's
        micro-batches are answered in order, as one process computes them."""
        last = self._pieces.get((name, client))
        if last is None or last[0] != step or last[1] >= last[2]:
            return 0
        return last[1]

    def next_evaluation(self, name, client) -> int:
        """The evaluation batch after the last one answered (0: none yet)."""
        return self._eval_step.get((name, client), 0) + 1

    def open_specs(self, name, client):
        """The U-shaped outputs a client's OUTPUT_GRADIENTS must match, or None."""
        return self._open.get((name, client))

    def remember(self, name, client, envelope, reply, data) -> None:
        """Keeps the reply `data` sent for `envelope`."""
        kind = envelope.kind
        if kind in TRAINING:
            replies = self._training.setdefault((name, client), {})
            replies[(envelope.step, kind, envelope.offset)] = data
            while len(replies) > self.keep:
                del replies[next(iter(replies))]
            if envelope.rows:
                end = envelope.offset + (envelope.tensors[0].shape[0] or 0)
                self._pieces[(name, client)] = (envelope.step, end, envelope.rows)
            if reply.kind == Kind.SERVER_OUTPUT:  # U-shaped: gradients must fit
                self._open[(name, client)] = [
                    (t.dtype, list(t.shape)) for t in reply.tensors
                ]
            else:
                self._open.pop((name, client), None)
        elif kind == Kind.EVALUATE:
            self._cache[("eval", name, client)] = (envelope.step, kind, data)
            self._eval_step[(name, client)] = envelope.step
        elif kind not in DATA_KINDS:
            # An orchestration message (REPORT, END, BEGIN) ends the client's
            # evaluation pass: its next one starts again at batch 1.
            for key in [k for k in self._cache if k[0] == "eval" and k[2] == client]:
                del self._cache[key]
            for key in [k for k in self._eval_step if k[1] == client]:
                del self._eval_step[key]
