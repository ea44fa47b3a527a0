"""An intermediate party of multi-hop split learning (Vepakomma et al. 2018).

A relay is a server to the party before it and a client of the party after
it: it receives cut tensors, runs its own segment on them and sends its
outputs on through its `link` (a transport to the next party, which may be
another relay or the server holding the loss). When the gradients of its
outputs come back, it applies its own update and answers with the gradients
of its inputs:

```
previous party ──a──► relay: tape{ b = segment(a) } ──b (+ y)──► next party
previous party ◄─dL/da── relay: tape.gradient(b, [a, vars], dL/db) ◄─dL/db──
```

In vanilla multi-hop the labels travel with the cut tensors to the last
party, so every relay on the way sees them; a relay never sees raw inputs.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras.parties.segment_party import SegmentParty
from splitkeras.parties.segment_step import apply_gradients, regularization, specs_of
from splitkeras.protocol import Kind, Message, Rejected, flat

__all__ = ["Relay"]


class Relay(SegmentParty):
    """An intermediate party: a server upstream, a client downstream.

    It passes the labels it receives on unchanged (vanilla multi-hop: the
    last party holds the loss), so it sees them; it never sees raw inputs.
    It can serve several upstream parties (replies keep their client id)
    and can chain: its `link` may lead to another relay.

    Args:
      segment: the relay's segment (incoming cut tensors -> outgoing ones).
      optimizer: the relay's own optimizer.
      link: the transport to the next party (has `request(message)`).
      client_id: the relay's id in the messages it sends over `link`.
    """

    # A host hosting a relay commits its state when a round ends through it.
    commit_on = (Kind.END,)
    # A host compiles these steps (the round trip onward is a py_function in
    # the graph), so a relay process computes what the fused in-process
    # step computes.
    compiled_kinds = (Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT)

    def __init__(self, segment, optimizer, link, client_id=0):
        self.segment = segment
        self.optimizer = optimizer
        self.link = link
        self.client_id = client_id

    # ------------------------------------------ what a host checks against
    def takes_labels(self, client_id: int) -> bool:
        return True  # vanilla multi-hop: the labels pass through to the last party

    num_classes = 0  # the last party checks the labels' range

    def arrival_specs(self, kind, client_id: int) -> list:
        return specs_of(self.segment.inputs)

    def output_specs(self) -> list:
        return specs_of(self.segment.outputs)

    def handle(self, message: Message) -> Message:
        """Answers one message from the previous party.

        Raises:
          ValueError: a message kind a relay does not forward, or a next
            party that does not answer a TRAIN message with GRADIENTS.
        """
        if message.kind in (Kind.BEGIN, Kind.END, Kind.REPORT):
            # Orchestration goes on to the next party (it coordinates the
            # round); a host commits this relay's state on each END.
            return self.link.request(message.replace(client_id=self.client_id))
        if message.kind == Kind.TRAIN:
            return self._train(message)
        if message.kind in (Kind.EVALUATE, Kind.PREDICT):
            outputs = flat(self.segment(_unflat(message.tensors), training=False))
            reply = self.link.request(self._onward(message, outputs))
            return self._back(message, reply)
        raise Rejected(
            "invalid",
            f"a relay cannot handle a {message.kind.name} message (client "
            f"{message.client_id}, step {message.step}); it forwards TRAIN, "
            "EVALUATE and PREDICT",
        )

    def _train(self, message):
        cut = list(message.tensors)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(cut)
            outputs = flat(self.segment(_unflat(cut), training=True))
            reg = regularization(self.segment)
        reply = self.link.request(self._onward(message, outputs))
        if reply.kind != Kind.GRADIENTS:
            raise ValueError(
                f"the party after this relay answered TRAIN with "
                f"{reply.kind.name}; a relay needs GRADIENTS (multi-hop is "
                "vanilla: the last party holds the labels and the loss)"
            )
        targets, seeds = list(outputs), list(reply.tensors)
        if reg is not None:
            targets.append(reg)
            seeds.append(tf.ones_like(reg))
        grads = tape.gradient(targets, cut + variables, output_gradients=seeds)
        apply_gradients(self.optimizer, grads[len(cut) :], variables)
        # A cut tensor the segment ignores still needs a gradient on the wire.
        cut_grads = [tf.zeros_like(c) if g is None else g for c, g in zip(cut, grads)]
        return self._back(message, reply, Kind.GRADIENTS, cut_grads)

    def _onward(self, message, outputs) -> Message:
        """The message to the next party: our outputs, the labels passed on."""
        return Message(
            kind=message.kind,
            client_id=self.client_id,
            step=message.step,
            tensors=tuple(outputs),
            labels=message.labels,
            sample_weight=message.sample_weight,
        )

    @staticmethod
    def _back(message, reply, kind=None, tensors=None) -> Message:
        """The answer to the previous party, carrying the next party's loss."""
        return Message(
            kind=reply.kind if kind is None else kind,
            client_id=message.client_id,
            step=message.step,
            tensors=tuple(reply.tensors if tensors is None else tensors),
            loss=reply.loss,
        )


def _unflat(tensors):
    tensors = list(tensors)
    return tensors[0] if len(tensors) == 1 else tensors
