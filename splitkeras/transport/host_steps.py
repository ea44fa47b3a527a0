"""How a host runs its parties' steps: compiled, as in one process.

In one process a step's parties are fused into one graph. A host runs only
its own parties' part, one message at a time, and compiles it the same way
(`HostSteps`): one `tf.function` per party, message kind and (for a party
with a model per client) client. So a host computes what the fused step
computes, to the bit. A party lists the kinds it may be compiled for in
`compiled_kinds`; a U-shaped server, whose step spans two messages, runs
each step as one graph paused between them (`Server.compile_paused_steps`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from splitkeras.parties.segment_step import compiled
from splitkeras.protocol import Kind, Message

__all__ = ["HostSteps"]


class HostSteps:
    """Answers a hosted party's messages, compiled where the party allows.

    Args:
      parties: the hosted parties ({name: party}); each gets the chance to
        compile its two-message steps (`compile_paused_steps`).
      run_eagerly / jit_compile: how steps are compiled.
    """

    def __init__(self, parties: dict, run_eagerly=False, jit_compile=False):
        self._fns = {}  # (party name, kind, client or 0) -> compiled step
        self._reply_kinds = {}  # the same key -> the kind its reply has
        self._parties = parties
        self._compile = (run_eagerly, jit_compile)
        # Called with (name, message) before each compiled step: a
        # multi-worker server's chief streams its steps to the other workers
        # (`splitkeras.transport.mirror`).
        self.mirror = None
        for party in parties.values():
            compile_paused = getattr(party, "compile_paused_steps", None)
            if compile_paused is not None:
                compile_paused(run_eagerly)

    def rolled_back(self) -> None:
        """Tells every hosted party its host went back to its last commit
        (a party ends what it holds open, e.g. a paused U-shaped step)."""
        for party in self._parties.values():
            rolled_back = getattr(party, "rolled_back", None)
            if rolled_back is not None:
                rolled_back()

    def handle(self, name, party, message) -> Message:
        """`party.handle(message)`, through its compiled step if it has one."""
        if message.kind not in getattr(party, "compiled_kinds", ()):
            return party.handle(message)
        fn = self.function(name, party, message.kind, message.client_id)
        key = self._key(name, party, message.kind, message.client_id)
        # A party that orders steps (SFLV2) does so around the compiled step.
        admit = getattr(party, "admit", None)
        if admit is not None:
            admit(message)
        pieces = None  # a micro-batch: its offset and the step's rows
        if message.rows:
            pieces = (
                tf.constant(message.offset, tf.int64),
                tf.constant(message.rows, tf.int64),
            )
        if self.mirror is not None:
            self.mirror(name, message)
        tensors, loss = fn(
            tf.constant(message.step, tf.int64),
            list(message.tensors),
            message.labels,
            message.sample_weight,
            message.ids,
            pieces,
        )
        kind = self._reply_kinds[key]
        reply = Message(
            kind,
            message.client_id,
            message.step,
            tuple(tensors),
            loss=None if kind == Kind.SERVER_OUTPUT else loss,
        )
        applied = getattr(party, "applied", None)
        if applied is not None:
            applied(message, reply)
        return reply

    def function(self, name, party, kind, client: int = 0):
        """The compiled step of `party` (hosted as `name`) for messages of
        `kind` from `client`: `fn(step, tensors, labels, sample_weight, ids,
        pieces)` -> (reply tensors, loss), `pieces` (offset, rows) of a
        micro-batch or None; made at the first call."""
        key = self._key(name, party, kind, client)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._compiled(party, kind, key)
        return fn

    @staticmethod
    def _key(name, party, kind, client):
        # A party with a model per client (SFLV1's copies) has a step each.
        return (name, kind, client if getattr(party, "per_client", False) else 0)

    def _compiled(self, party, kind, key):
        client = key[2]

        def run(step, tensors, labels, sample_weight, ids, pieces):
            # The step id goes on with what a relay sends to the next party.
            offset, rows = pieces if pieces is not None else (0, 0)
            reply = party.handle(
                Message(
                    kind,
                    client,
                    step,
                    tuple(tensors),
                    labels,
                    sample_weight,
                    ids=ids,
                    offset=offset,
                    rows=rows,
                )
            )
            self._reply_kinds[key] = reply.kind
            loss = reply.loss if reply.loss is not None else tf.constant(np.nan)
            return list(reply.tensors), loss

        run_eagerly, jit_compile = self._compile
        # A relay's step holds its gRPC round trip to the next party (a
        # py_function), which XLA cannot compile.
        jit_compile = jit_compile and getattr(party, "link", None) is None
        return compiled(run, run_eagerly, jit_compile)
