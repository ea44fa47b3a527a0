"""Who trains when: the coordinator of a run's rounds, next to the server.

Clients begin and end their part of every round with the coordinator (BEGIN,
END) and the evaluating client reports each round's test figures (REPORT).
The coordinator keeps where the run is as checkpointable variables, gathers
the round's training and validation logs (from the server-side label holder
and from what clients report), and commits through `on_commit` at the end
of every transaction: a turn of round robin (`turn_coordinator.Turns`), a whole
round otherwise (`Rounds`).

It never blocks. A client that must wait gets a WAIT answer and asks again:
a gRPC host waits between two asks, and in one process the schedule runs its
clients in an order in which nobody has to wait. The same object serves in
one process and in a gRPC host; only the host calls `check` (the transport
between trusted in-process parties needs no checks).
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from splitkeras.parties.microbatches import is_piece, last_piece
from splitkeras.protocol import Kind, Message, NotYet, Rejected, Status

log = logging.getLogger("splitkeras")

__all__ = ["TRAINING", "Coordinator", "Rounds", "pending"]

TRAINING = (Kind.TRAIN, Kind.OUTPUT_GRADIENTS)


class Coordinator:
    """Base of `Turns` and `Rounds`: the position, the logs, the commits.

    Args:
      server: the hosted party data messages go to (`handle(message)`); its
        `objective`, if any, is the label holder's (vanilla).
      num_clients: K.
      epochs: rounds of the run (None: no end, e.g. `train_epoch` calls).
      reports: wait for the evaluating client's REPORT before a round ends.
    """

    def __init__(self, server, num_clients: int, epochs=None, reports=False):
        self.server = server
        self.num_clients = num_clients
        self.epochs = epochs
        self.expect_reports = reports
        self.round = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # The last round each client ended (-1: none): a retried END of an
        # applied one is answered again, anything else refused.
        self.ended = [
            tf.Variable(-1, dtype=tf.int64, trainable=False) for _ in range(num_clients)
        ]
        # The earliest of them in one compiled read: a read per variable
        # made every END cost a read per client (minutes per round at 500).
        self._earliest_ended = tf.function(
            lambda: tf.reduce_min(tf.stack([v.read_value() for v in self.ended]))
        )
        self.on_commit = None  # called after each transaction (a host saves)
        self.on_round_end = None  # called as on_round_end(round, train, val)
        self.on_rollback = None  # a host restores its last commit
        self._client_logs = {}  # round -> [(training metrics, examples) from END]
        self._counts = {}  # round -> {client: examples} from END
        self._reports = {}  # round -> metrics from REPORT
        self.logs = {}  # round -> (train, validation), once the round ended

    @property
    def objective(self):
        return getattr(self.server, "objective", None)

    def __getattr__(self, name):
        # What a host asks the party it serves (arrival_specs, takes_labels,
        # num_classes, output_specs, compiled_kinds, pending, ...) is the
        # server's to answer.
        if name.startswith("_") or name == "server":
            raise AttributeError(name)
        return getattr(self.server, name)

    def trackables(self) -> dict:
        """The coordinator's checkpointed state."""
        named = {"round": self.round, "step": self.step}
        named.update({f"ended_{k}": v for k, v in enumerate(self.ended)})
        return named

    def position(self) -> tuple:
        return (int(self.round.numpy()),)

    @property
    def done(self) -> bool:
        return self.epochs is not None and int(self.round.numpy()) >= self.epochs

    # ---------------------------------------------------------------- messages
    def handle(self, message: Message) -> Message:
        """Answers one message: orchestration here, steps by the server."""
        kind = message.kind
        if kind == Kind.BEGIN:
            return self.begin(message)
        if kind == Kind.END:
            return self.end(message)
        if kind == Kind.REPORT:
            return self.report(message)
        # Steps, and what else the server answers (weights, models).
        reply = self.server.handle(message)
        counts = getattr(self.server, "counts_as_step", None)
        if (
            kind == Kind.OUTPUT_GRADIENTS
            or (kind == Kind.TRAIN and reply.kind == Kind.GRADIENTS)
        ) and (counts is None or counts(message)):
            # An applied training step (a micro-batched one with its last
            # micro-batch; a vertical batch once, not once per party).
            applied = tf.cast(last_piece(message), tf.int64) if is_piece(message) else 1
            self.step.assign_add(applied)
        return reply

    def check(self, message: Message) -> None:
        """Refuses a step the run is not at (a gRPC host calls this first).

        Raises:
          Rejected: "restart" when the sender must begin its turn or round
            again.
        """

    def begin(self, message: Message) -> Message:
        raise NotImplementedError

    def end(self, message: Message) -> Message:
        raise NotImplementedError

    def report(self, message: Message) -> Message:
        """The evaluating client's figures for a round (validation logs)."""
        self._reports[int(message.round)] = dict(message.metrics or {})
        self._maybe_end_round(int(message.round))
        return self._reply(message, Kind.ACK)

    def _log_end(self, r, message) -> None:
        count = int(message.count)
        self._client_logs.setdefault(r, []).append((dict(message.metrics or {}), count))
        self._counts.setdefault(r, {})[message.client_id] = count

    def rolled_back(self) -> None:
        """Forgets what was not committed (a host restored its checkpoint),
        and so does the server."""
        self._client_logs.clear()
        self._reports.clear()
        self._counts.clear()
        server_rolled_back = getattr(self.server, "rolled_back", None)
        if server_rolled_back is not None:
            server_rolled_back()

    def tick(self) -> None:
        """Periodic check by a host (timeouts)."""

    # ---------------------------------------------------------------- rounds
    def _start_round(self) -> None:
        if self.objective is not None:
            self.objective.reset(training=True)

    def _round_trained(self, r: int) -> bool:
        return not self.ended or int(self._earliest_ended()) >= r

    def _maybe_end_round(self, r: int) -> bool:
        """Ends round `r` once trained (and reported, if reports are expected)."""
        if r != int(self.round.numpy()) or not self._round_trained(r):
            return False
        if self.expect_reports and r not in self._reports:
            return False
        self._close_round(r)
        if not self.done:
            self._start_round()
        return True

    def _close_round(self, r: int) -> None:
        """Round `r` is over: its logs, the next round, a commit."""
        train, val = self._round_logs(r)
        self.logs[r] = (train, val)
        self.round.assign(r + 1)
        if self.on_round_end is not None:
            self.on_round_end(r, train, val)
        self._commit()

    def _round_logs(self, r: int) -> tuple[dict, dict]:
        reports = [(m, n) for m, n in self._client_logs.pop(r, []) if m]
        val = self._validation(r)
        objective = self.objective
        if objective is not None:
            train = {k: float(v) for k, v in objective.result(training=True).items()}
            return train, val
        # Clients' figures weighted by the examples behind them (END's count).
        self._counts.pop(r, None)
        keys = sorted({k for m, _ in reports for k in m})
        train = {}
        for key in keys:
            pairs = [(m[key], n) for m, n in reports if key in m]
            total = sum(n for _, n in pairs)
            if total > 0:
                train[key] = float(sum(v * n for v, n in pairs) / total)
            else:
                train[key] = float(np.mean([v for v, _ in pairs]))
        return train, val

    def _validation(self, r: int) -> dict:
        """Round `r`'s validation figures: the evaluating client's report, the
        label holder's figures here (vanilla) of the pass it reports, and the
        server's `evaluation_figures()` if it has them (a vertical host's
        label-leak AUCs)."""
        if r not in self._reports:
            return {}
        # The server's figures first: should they fail, the report stays for
        # the REPORT asked again.
        figures = getattr(self.server, "evaluation_figures", None)
        extra = figures() if figures is not None else {}
        val = dict(self._reports.pop(r))
        objective = self.objective
        if objective is not None:
            val.update(objective.result(training=False))
            objective.reset(training=False)
        val.update(extra)
        return val

    def _commit(self) -> None:
        if self.on_commit is not None:
            self.on_commit()

    def _rollback(self, why: str) -> None:
        if self.on_rollback is None:
            raise Rejected("restart", why)
        log.warning("Rolling back to the last commit: %s", why)
        self.on_rollback()

    @staticmethod
    def _reply(message, kind, status=Status.READY, **fields) -> Message:
        fields = {"step": message.step, "round": message.round, **fields}
        return Message(kind=kind, client_id=message.client_id, status=status, **fields)


class Rounds(Coordinator):
    """Every client takes part in every round; the round ends when all have
    ended it (and the evaluator has reported), then it commits.

    Clients begin round r only once round r-1 has ended (the barrier is at
    the start, so in one process running clients one after the other never
    waits). A round is a transaction: a host that restarts, or a client that
    begins a round again after a crash, rolls every party back to the
    round's start.

    Args:
      server, num_clients, epochs, reports: as `Coordinator`.
      on_trained: called as `on_trained(round, {client: examples})` once
        every client has ended the round, before the evaluation (e.g.
        SplitFed v1 averages its server copies here).
      evaluators: the clients whose EVALUATE messages count (client 0
        evaluates the round's model; in a vertical split every feature
        holder sends its part of each test batch); None: any client.
    """

    def __init__(
        self,
        server,
        num_clients,
        epochs=None,
        reports=False,
        on_trained=None,
        evaluators=(0,),
    ):
        super().__init__(server, num_clients, epochs, reports)
        self.on_trained = on_trained
        self.evaluators = None if evaluators is None else set(evaluators)
        self.begun = set()  # clients in the current round
        self._batches = {}  # client -> the batches it said at BEGIN

    def rolled_back(self) -> None:
        super().rolled_back()
        self.begun.clear()
        self._batches.clear()

    def begin(self, message):
        k, r = message.client_id, int(message.round)
        current = int(self.round.numpy())
        if self.done:
            return self._reply(message, Kind.BEGIN, Status.DONE, round=current)
        if r < current:
            return self._reply(message, Kind.BEGIN, Status.PASSED, round=current)
        if r > current:
            if r > current + 1 or int(self.ended[k].numpy()) < current:
                # The run went back (a host restarted): train that round again.
                raise Rejected(
                    "restart",
                    f"client {k} begins round {r}, but round {current} has not "
                    "been trained by it here (the host went back to its last "
                    f"commit): train round {current} again",
                )
            return self._reply(message, Kind.BEGIN, Status.WAIT, round=current)
        if k in self.begun and int(self.ended[k].numpy()) < r:
            self._rollback(f"client {k} began round {r} again")
        if not self.begun:
            self._start_round()
        self.begun.add(k)
        self._batches[k] = int(message.count)
        begun = getattr(self.server, "begun", None)
        if begun is not None:  # e.g. SplitFed v2's step order needs batch counts
            begun(k, int(message.count))
        return self._reply(message, Kind.BEGIN, step=int(self.step.numpy()))

    def check(self, message):
        k, current = message.client_id, int(self.round.numpy())
        if message.kind == Kind.PREDICT:
            return
        if message.kind == Kind.EVALUATE:
            if self.evaluators is not None and k not in self.evaluators:
                raise Rejected(
                    "denied",
                    f"client {k} does not evaluate this run: client"
                    f"{'s' if len(self.evaluators) > 1 else ''} "
                    f"{', '.join(map(str, sorted(self.evaluators)))} "
                    f"{'do' if len(self.evaluators) > 1 else 'does'}",
                )
            if int(self.ended[k].numpy()) < current:
                raise Rejected(
                    "restart",
                    f"client {k} evaluates round {current} before ending it here "
                    "(the host went back to its last commit): train it again",
                )
            if not self._round_trained(current):
                raise NotYet(f"round {current} is still training")
            return
        if k not in self.begun or int(self.ended[k].numpy()) >= current:
            raise Rejected(
                "restart",
                f"client {k} is not in round {current}: begin the round",
            )

    def end(self, message):
        k, r = message.client_id, int(message.round)
        current = int(self.round.numpy())
        if int(self.ended[k].numpy()) >= r:  # a retry of an applied END
            return self._reply(message, Kind.ACK, round=current)
        if r != current or k not in self.begun:
            raise Rejected(
                "restart",
                f"client {k} ends round {r}, but the run is at round {current} "
                "and this client has not begun it: begin the round",
            )
        if pending(self.server, k):
            raise Rejected(
                "restart", f"client {k} ends round {r} with a step half done"
            )
        self.ended[k].assign(r)
        # Clients with whole models train where the server does not see
        # their steps: they count as the batches said times the server's
        # steps per batch (FedAvg's local epochs, large-batch SGD's 1).
        per_batch = getattr(self.server, "steps_per_batch", 0)
        self.step.assign_add(self._batches.pop(k, 0) * per_batch)
        self._log_end(r, message)
        if self._round_trained(r) and self.on_trained is not None:
            self.on_trained(r, self._counts.get(r, {}))
        self._maybe_end_round(r)
        return self._reply(message, Kind.ACK, round=int(self.round.numpy()))

    def report(self, message):
        r = int(message.round)
        if r in self.logs and not self.expect_reports:
            # The round ended without waiting for it (one process): the
            # report completes its validation logs.
            self._reports[r] = dict(message.metrics or {})
            train, _ = self.logs[r]
            self.logs[r] = (train, self._validation(r))
            return self._reply(message, Kind.ACK)
        current = int(self.round.numpy())
        if r < current:  # a retry: the round ended, so its report was applied
            return self._reply(message, Kind.ACK)
        if r > current:
            raise Rejected(
                "restart",
                f"client {message.client_id} reports round {r}, but the run is "
                f"at round {current} (the host went back to its last commit): "
                "train it again",
            )
        if not self._round_trained(r):
            # The evaluating client is done before the others (its test pass
            # needed nothing from here): it asks again.
            return self._reply(message, Kind.ACK, Status.WAIT)
        return super().report(message)

    def _start_round(self) -> None:
        super()._start_round()
        self.begun = set()
        self._batches = {}
        start = getattr(self.server, "start_round", None)
        if start is not None:
            start()


def pending(server, client: int) -> bool:
    """True when `server` holds a half-done (U-shaped) step of `client`."""
    ask = getattr(server, "pending", None)
    return bool(ask(client)) if ask is not None else False
