"""Vertical parties agree on their common samples without showing their ids.

Before a vertical run trains, its parties align their rows: each holds its
own sample ids, and they must find the samples all of them hold, in one
order, without any party learning an id outside that intersection, and
without ids ever travelling in clear. They run an elliptic-curve
Diffie-Hellman private set intersection (`splitkeras.psi`) through the
server's `Aligner`, written against links (PSI messages):

1. every party blinds its hashed ids with its secret and posts the list
   (hop 0);
2. each list then passes every other party once, in a ring: at hop h party
   k fetches the list of party k - h, blinds it with its own secret and
   posts it on;
3. once every list carries every secret, the aligner intersects them (equal
   ids are now equal values) and answers each party with its rows of the
   intersection, in the label owner's row order.

The aligner sees blinded values only; a party sees only other parties'
blinded lists. Every party then trains on its rows in that common order,
and each batch names rows of it (0, 1, ...), never ids.
"""

from __future__ import annotations

import numpy as np

from splitkeras import psi
from splitkeras.protocol import Kind, Message, Rejected, Status

__all__ = ["Aligner", "align"]

_POST, _FETCH = 0, 1  # a PSI message's step: what it asks


class Aligner:
    """The server's side of the intersection: it relays blinded lists and
    intersects the fully blinded ones.

    Args:
      num_parties: the parties that align (every vertical client).
      leader: the party whose row order the common order follows (the
        label owner).
    """

    def __init__(self, num_parties: int, leader: int = 0):
        self.num_parties = num_parties
        self.leader = leader
        self._lists = {}  # (owner, hop) -> blinded points
        self._rows = None  # party -> rows, once every list is fully blinded

    def handle(self, message: Message) -> Message:
        if message.kind != Kind.PSI:
            raise Rejected("invalid", f"the aligner takes PSI, not {message.kind.name}")
        hop, owner = int(message.round), int(message.count)
        if not 0 <= hop <= self.num_parties or not 0 <= owner < self.num_parties:
            raise Rejected("invalid", f"PSI hop {hop} of party {owner} is out of range")
        if int(message.step) == _POST:
            return self._post(message, hop, owner)
        return self._fetch(message, hop)

    def _post(self, message, hop, owner):
        points = _points(message.state, f"party {message.client_id}'s hop {hop}")
        self._lists[(owner, hop)] = points
        if hop == self.num_parties - 1 and self._rows is None:
            finals = {o: p for (o, h), p in self._lists.items() if h == hop}
            if len(finals) == self.num_parties:
                self._rows = psi.intersection_rows(finals, self.leader)
        return Message(Kind.ACK, message.client_id, round=hop)

    def _fetch(self, message, hop):
        k = message.client_id
        if hop == self.num_parties:  # the result
            if self._rows is None:
                return _wait(message)
            rows = np.asarray(self._rows[k], np.int64)
            return Message(
                Kind.PSI, k, round=hop, count=len(rows), state=rows.tobytes()
            )
        owner = (k - hop) % self.num_parties
        points = self._lists.get((owner, hop - 1))
        if points is None:
            return _wait(message)
        return Message(Kind.PSI, k, round=hop, count=owner, state=points.tobytes())


def _wait(message) -> Message:
    return Message(Kind.PSI, message.client_id, round=message.round, status=Status.WAIT)


def _points(data: bytes, what: str) -> np.ndarray:
    if len(data) % 32:
        raise Rejected("invalid", f"{what}: {len(data)} bytes are not 32-byte points")
    return np.frombuffer(data, np.uint8).reshape(-1, 32).copy()


def align(link, party: int, num_parties: int, ids, secret: bytes | None = None):
    """This party's side of the intersection, as a generator (one yield per
    hop, so that one process can run every party in turn).

    Args:
      link: to the `Aligner`.
      party: this party's id (its client id).
      num_parties: the parties that align.
      ids: this party's sample ids, in its row order.
      secret: this party's 32-byte secret (None: a fresh one).

    Returns (as the generator's value):
      This party's rows of the intersection, in the common order.
    """
    blinder = psi.Blinder(secret)
    points = blinder.blind(psi.hash_ids(ids))
    _send(link, party, _POST, 0, party, points.tobytes())
    yield
    for hop in range(1, num_parties):
        reply = link.poll(Message(Kind.PSI, party, _FETCH, round=hop))
        received = _points(reply.state, f"hop {hop}")
        _send(
            link, party, _POST, hop, int(reply.count), blinder.blind(received).tobytes()
        )
        yield
    reply = link.poll(Message(Kind.PSI, party, _FETCH, round=num_parties))
    return np.frombuffer(reply.state, np.int64).copy()


def _send(link, party, op, hop, owner, state):
    link.request(Message(Kind.PSI, party, op, round=hop, count=owner, state=state))
