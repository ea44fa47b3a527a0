"""A client's part of round robin, whatever runs its segment. No TensorFlow.

`TurnClient` is written against links: it begins its turn with the
coordinator (BEGIN: it may wait for other clients' turns), takes the state
the previous client handed on (sealed with the clients' AES key), trains,
evaluates if it is the round's last client (then REPORTs), hands its own
state on and ends the turn (END). With the "server" handoff the sealed
state travels inside END and the next client's BEGIN reply, through the
coordinator, which cannot read it; with "peer" it goes straight to the next
client's `Inbox` (HANDOFF) and never through the server.

The Keras client (`splitkeras.schedules.round_robin.KerasTurns`), in one
process or over gRPC, and the LiteRT edge client (`splitkeras.edge`) differ
only in the hooks: how a turn is trained and evaluated, how state is packed.
"""

from __future__ import annotations

import logging
import os

from splitkeras.protocol import Kind, Message, Status
from splitkeras.transport.sealing import HandoffError, Sealer

log = logging.getLogger("splitkeras")

__all__ = ["HANDOFF_MODES", "Inbox", "TurnClient"]

HANDOFF_MODES = ("peer", "server")


class Inbox:
    """Where a client receives the state handed on by the previous client
    (peer handoff): a party of its own that answers HANDOFF.

    Args:
      owner: the receiving client's id.
      path: a file to keep the sealed state in, so that a restarted client
        still has it (None: memory only).
    """

    def __init__(self, owner: int, path: str | None = None):
        self.owner = owner
        self.path = path
        self._blob = None
        if path is not None and os.path.exists(path):
            with open(path, "rb") as f:
                self._blob = f.read()

    def handle(self, message: Message) -> Message:
        if message.kind != Kind.HANDOFF:
            from splitkeras.protocol import Rejected

            raise Rejected(
                "invalid", f"client {self.owner}'s inbox takes HANDOFF messages only"
            )
        self._blob = bytes(message.state)
        if self.path is not None:
            with open(self.path + ".tmp", "wb") as f:
                f.write(self._blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.path + ".tmp", self.path)
        return Message(Kind.ACK, message.client_id, message.step, round=message.round)

    def peek(self) -> bytes | None:
        """The newest state received, or None."""
        return self._blob


class TurnClient:
    """Client k's turns of a round robin, over a link to the coordinator.

    Subclasses implement `_train_steps(epoch, skip)` (a generator that trains
    the turn's batches and yields once per step), `_evaluate()`,
    `_metrics()` (the turn's training figures this client holds),
    `_packed_state() -> bytes`, `_load_state(plain or None for the initial
    state)` and the `steps` property (training steps so far, settable).

    Args:
      link: to the coordinator: `request(message)` and `poll(message)`.
      client_id: this client's id, 0..K-1.
      num_clients: K.
      key: the clients' shared AES-256 key (None: no turns, e.g. split
        inference only).
      handoff: "server" or "peer".
      peer_link: peer handoff: a link to the next client's inbox.
      inbox: peer handoff: this client's own `Inbox`.
      counters: where to count handed-on bytes received from a peer
        (`ByteCounters`-like with `add(name, client, n)`), or None.
    """

    restart_errors: tuple = ()  # what a rolled-back turn's failure arrives as

    def __init__(
        self,
        link,
        client_id: int,
        num_clients: int,
        key,
        handoff: str = "server",
        peer_link=None,
        inbox: Inbox | None = None,
        counters=None,
    ):
        if handoff not in HANDOFF_MODES:
            raise ValueError(
                f"unknown weight handoff {handoff!r}; choose one of "
                f"{', '.join(HANDOFF_MODES)}"
            )
        if (
            handoff == "peer"
            and num_clients > 1
            and (peer_link is None or inbox is None)
        ):
            raise ValueError(
                "a peer handoff needs a link to the next client and an inbox"
            )
        self.link = link
        self.client_id = client_id
        self.num_clients = num_clients
        self.handoff = handoff
        self.peer_link = peer_link
        self.inbox = inbox
        self.counters = counters
        self.set_key(key)
        self.restarts = 0

    def set_key(self, key) -> None:
        """The clients' shared key (None: split inference only)."""
        self._sealer = Sealer(key, self.client_id) if key is not None else None

    # ------------------------------------------------------------- hooks
    def _train_steps(self, epoch: int, skip: int):
        raise NotImplementedError

    def _evaluate(self) -> dict:
        raise NotImplementedError

    def _metrics(self) -> dict:
        return {}

    def _packed_state(self) -> bytes:
        raise NotImplementedError

    def _load_state(self, plain: bytes | None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------- turns
    def _check_key(self) -> None:
        if self._sealer is None:
            raise ValueError(
                f"client {self.client_id} was made without the clients' handoff "
                "key (key=None: split inference only); taking turns needs it to "
                "open and seal the handed-on state"
            )

    def begin_turn(self, epoch: int) -> Message:
        """Waits for this client's turn of `epoch`; the BEGIN reply (status
        READY: it is ours; PASSED: it was skipped; DONE: the run is over)."""
        self._check_key()
        return self.link.poll(Message(Kind.BEGIN, self.client_id, round=epoch))

    def _take_state(self, begin: Message) -> None:
        """Loads the state handed on to this turn (or, at the run's first
        turn, the initial state). The state must be the one the client
        before this one sealed for it at the end of its turn just before
        this one (`Sealer.open_turn`); anything else (stale, replayed,
        redirected, missing) is refused and this client's state stays as
        it was."""
        if self.num_clients == 1:
            return  # nobody hands anything on: the client keeps its own
        epoch, k = int(begin.round), self.client_id
        first = (epoch, k) == (0, 0)
        blob = begin.state
        if self.handoff == "peer":
            blob = b"" if first else (self.inbox.peek() or b"")
            if blob and self.counters is not None:
                self.counters.add("handoff_bytes_received", k, len(blob))
        if first:
            if blob:
                raise HandoffError(
                    f"client {k} begins the run's first turn, which starts from "
                    f"the initial state, but was handed a state ({len(blob)} "
                    "bytes): refused"
                )
            self._load_state(None)
            return
        if not blob:
            raise HandoffError(
                f"client {k} begins its turn of round {epoch} but no state was "
                "handed on to it: refused (only the run's first turn starts "
                "from the initial state); it keeps its own"
            )
        self._load_state(self._sealer.open_turn(blob, self.num_clients, epoch))

    def _hand_on(self, epoch: int) -> bytes:
        """Seals this client's state for the next one; the blob END carries
        ("server"), or b"" after sending it to the next client ("peer")."""
        if self.num_clients == 1:
            return b""
        following = (self.client_id + 1) % self.num_clients
        blob = self._sealer.seal(self._packed_state(), following, epoch)
        if self.handoff == "server":
            return blob
        self.peer_link.request(
            Message(Kind.HANDOFF, self.client_id, self.steps, round=epoch, state=blob)
        )
        return b""

    def turn(self, epoch: int, evaluate: bool = False, skip: int = 0):
        """This client's turn of `epoch`, as a generator: one yield per step.

        Args:
          epoch: the round.
          evaluate: evaluate once trained (the round's last client) and
            REPORT the figures.
          skip: batches already trained in this turn (a resumed run whose
            weights come from its own checkpoint: nothing is handed on).

        Returns (as the generator's value): the BEGIN status (READY, PASSED
        or DONE).
        """
        begin = self.begin_turn(epoch)
        if begin.status != Status.READY:
            return begin.status
        if not skip:
            self._take_state(begin)
        self.steps = int(begin.step)
        yield from self._train_steps(epoch, skip)
        metrics = self._metrics()
        if evaluate:
            figures = self._evaluate()
            self.link.request(
                Message(
                    Kind.REPORT,
                    self.client_id,
                    self.steps,
                    round=epoch,
                    metrics=figures,
                )
            )
        state = self._hand_on(epoch)
        self.link.request(
            Message(
                Kind.END,
                self.client_id,
                self.steps,
                round=epoch,
                state=state,
                metrics=metrics,
            )
        )
        return Status.READY

    def run_turns(self, epochs: int, first_epoch: int = 0) -> None:
        """Trains this client's turn of every epoch until the run is done (the
        last client of each round evaluates); a rolled-back turn is trained
        again. The loop of a process with no TensorFlow (the edge client)."""
        self._check_key()
        epoch = first_epoch
        while epoch < epochs:
            try:
                status = yield_all(
                    self.turn(epoch, self.client_id == self.num_clients - 1)
                )
            except self.restart_errors as e:
                self.restarts += 1
                log.warning(
                    "client %d: turn of round %d restarts: %s", self.client_id, epoch, e
                )
                self._turn_restarted()
                continue
            if status == Status.DONE:
                return
            epoch += 1
        # Waits until the host says the run is over (it serves until every
        # client has heard so).
        self.link.poll(Message(Kind.BEGIN, self.client_id, round=epochs))

    def _turn_restarted(self) -> None:
        """Called before a rolled-back turn is trained again."""


def yield_all(generator):
    """Runs a generator to its end; returns its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
