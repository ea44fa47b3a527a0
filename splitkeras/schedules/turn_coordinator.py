"""Round robin's coordinator: client 0, 1, ..., K-1 train in turn.

A turn is the transaction of round robin: `Turns` commits when the client
ends it and rolls back to its start when it cannot finish. The base, its
position, logs and commits, is `splitkeras.schedules.coordinator`.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from splitkeras.protocol import Kind, NotYet, Rejected, Status
from splitkeras.schedules.coordinator import TRAINING, Coordinator, pending

log = logging.getLogger("splitkeras")

__all__ = ["Turns"]


class Turns(Coordinator):
    """Round robin: client 0, 1, ..., K-1 train in turn, every round.

    A turn is a transaction: it commits when the client ends it, and a turn
    that cannot finish (the client began it again after a crash, or went
    silent for `turn_timeout` seconds) rolls back to its start; a silent
    client's turn is skipped (listed in `skipped`). With `store_state` (the
    "server" handoff) the sealed state a client ends its turn with is kept
    here and given to the next client at BEGIN; the coordinator cannot read
    it.

    Args:
      server, num_clients, epochs, reports: as `Coordinator`.
      store_state: keep and forward the clients' sealed states.
      turn_timeout: seconds of silence before a turn is skipped (None: never).
      clock: a time source (host: time.monotonic).
      ahead: how many steps past the next one a client may send before
        their turn to be applied comes (`config.train.max_staleness`): such
        a step waits for the steps before it.
    """

    def __init__(
        self,
        server,
        num_clients,
        epochs=None,
        reports=False,
        store_state=False,
        turn_timeout=None,
        clock=None,
        ahead=0,
    ):
        super().__init__(server, num_clients, epochs, reports)
        self.ahead = int(ahead)
        self.turn = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.state = tf.Variable(b"", dtype=tf.string, trainable=False)
        self.store_state = store_state
        self.turn_timeout = turn_timeout
        self.clock = clock
        self.skipped = []  # {"epoch", "client"} of turns skipped after silence
        self.active = None  # the client training its turn, or None
        self.last_seen = None
        self.told_done = set()  # clients told the run is over

    def trackables(self) -> dict:
        return {**super().trackables(), "turn": self.turn, "state": self.state}

    def position(self) -> tuple:
        return int(self.round.numpy()), int(self.turn.numpy())

    def seen(self, client: int) -> None:
        """A message of `client` arrived (its turn is not silent)."""
        if self.active == client and self.clock is not None:
            self.last_seen = self.clock()

    def rolled_back(self) -> None:
        super().rolled_back()
        self.active = None

    def begin(self, message):
        k, epoch = message.client_id, int(message.round)
        self.tick()
        r, turn = self.position()
        if self.done:
            self.told_done.add(k)
            return self._reply(message, Kind.BEGIN, Status.DONE, round=r)
        if (epoch, k) < (r, turn):  # that turn is over (trained or skipped)
            return self._reply(message, Kind.BEGIN, Status.PASSED, round=r)
        if (epoch, k) != (r, turn):
            return self._reply(message, Kind.BEGIN, Status.WAIT, round=r)
        if self.active == k:
            self._rollback(f"client {k} began its turn of round {epoch} again")
        self.active = k
        if self.clock is not None:
            self.last_seen = self.clock()
        if turn == 0:
            self._start_round()
        state = self.state.numpy() if self.store_state else b""
        return self._reply(
            message, Kind.BEGIN, step=int(self.step.numpy()), state=state
        )

    def check(self, message):
        k = message.client_id
        if message.kind == Kind.PREDICT:
            return
        r, turn = self.position()
        if self.active != k:
            raise Rejected(
                "restart",
                f"client {k} is not training a turn (the run is at round {r}, "
                f"turn {turn}): begin the turn",
            )
        # (U-shaped: OUTPUT_GRADIENTS completes the step its TRAIN opened.)
        expected = int(self.step.numpy()) + 1
        step = int(message.step)
        if message.kind in TRAINING and expected < step <= expected + self.ahead:
            raise NotYet(f"step {step} of client {k} waits for step {expected}")
        if message.kind in TRAINING and step != expected:
            raise Rejected(
                "restart",
                f"step {message.step} of client {k} is out of order: the "
                f"server has applied {expected - 1} steps and expects step "
                f"{expected} (the turn restarted: begin it again)",
            )

    def end(self, message):
        k, epoch = message.client_id, int(message.round)
        r, turn = self.position()
        if (epoch, k) < (r, turn) and self.active != k:
            if int(self.ended[k].numpy()) == epoch:  # a retry of an applied END
                return self._reply(message, Kind.ACK, round=r)
            raise Rejected(
                "restart",
                f"client {k}'s turn of round {epoch} was skipped (silent past "
                "the turn timeout); its steps were rolled back",
            )
        if self.active != k or (epoch, k) != (r, turn):
            raise Rejected(
                "restart",
                f"client {k} ends a turn it is not training (the run is at "
                f"round {r}, turn {turn})",
            )
        if int(message.step) != int(self.step.numpy()) or pending(self.server, k):
            raise Rejected(
                "restart",
                f"client {k} ends its turn at step {message.step}, the server "
                f"has applied {int(self.step.numpy())}: begin the turn again",
            )
        if self.store_state:
            self.state.assign(message.state)
        self.ended[k].assign(epoch)
        self._log_end(epoch, message)
        self._advance()
        return self._reply(message, Kind.ACK, round=int(self.round.numpy()))

    def report(self, message):
        if self.active != message.client_id:
            raise Rejected(
                "restart",
                f"client {message.client_id} reports round {message.round} "
                "outside its turn",
            )
        self._reports[int(message.round)] = dict(message.metrics or {})
        return self._reply(message, Kind.ACK)

    def _advance(self) -> None:
        """Ends the active turn: the next position, the round's end, a commit."""
        r, turn = self.position()
        self.active = None
        if self.clock is not None:
            self.last_seen = self.clock()
        if turn + 1 < self.num_clients:
            self.turn.assign(turn + 1)
            self._commit()
            return
        self.turn.assign(0)
        # The last client reported (if it evaluates) before ending its turn.
        self._close_round(r)

    def tick(self) -> None:
        """Skips the turn of a client silent for `turn_timeout` seconds."""
        if self.turn_timeout is None or self.clock is None or self.done:
            return
        if self.last_seen is None or self.clock() - self.last_seen <= self.turn_timeout:
            return
        r, turn = self.position()
        if self.active is not None:
            self._rollback(f"client {turn} silent for {self.turn_timeout:.0f} s")
        log.warning("Skipping client %d's turn of round %d", turn, r)
        self.skipped.append({"epoch": r, "client": turn})
        self._client_logs.setdefault(r, []).append(({}, 0))
        self._advance()
