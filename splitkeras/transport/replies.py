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
    """The last reply per (party, client), by step id and kind."""

    def __init__(self):
        self._cache = {}  # (party, client) -> (step, kind, reply bytes)
        self._eval_step = {}  # (party, client) -> last evaluation batch
        self._open = {}  # (party, client) -> U-shaped outputs awaiting gradients

    def clear(self) -> None:
        """Forgets everything (a rollback: the steps are trained again)."""
        self._cache.clear()
        self._open.clear()
        self._eval_step.clear()

    def cached(self, name, client, envelope):
        """The reply already sent for this very message, or None."""
        key = (name, client) if envelope.kind in TRAINING else ("eval", name, client)
        cached = self._cache.get(key)
        if cached and cached[:2] == (envelope.step, envelope.kind):
            return cached[2]
        return None

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
            self._cache[(name, client)] = (envelope.step, kind, data)
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
