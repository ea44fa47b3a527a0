"""The one schedule interface: parties, roles, a round, evaluation, state.

A schedule is a configuration of split learning (round robin, SplitFed,
vertical, ...): which parties there are, what each does in a round, who
evaluates, and what each keeps in its checkpoint. It is written against
links (a message goes out, its reply comes back), never against another
party's variables: weights move between parties only as messages
(handoff, averages, models, gradients), which the transport encodes,
checks, counts and, for handoffs, seals like activations.

Every schedule has two kinds of parties:

- clients (data parties): hold data and drive their part of each round
  through their links (`client_program`);
- hosted parties: answer messages (the server and its `Coordinator`, an
  averager, relays, task heads), built by `hosted_parties`.

In one process (`Schedule` instances, `train_epoch`, `splitkeras train`)
every party lives here and `LocalTransport`s link them, and the round runs
its clients in an order in which nobody has to wait. Over gRPC each process
builds only its own parties (`splitkeras.host_process`,
`splitkeras.client_process`) and the same programs run against gRPC links;
the coordinator then makes clients wait for their turn or for the round's
barrier.
"""

from __future__ import annotations

from splitkeras.transport.turns import yield_all

__all__ = ["Schedule"]


class Schedule:
    """Base of every configuration run in one process.

    Subclasses set `coordinator` (a `splitkeras.schedules.coordinator`
    object, also reachable as the hosted "server" party) and implement:

    - `round(epoch, client_datasets, test=None, skip=0)`: a generator that
      runs round `epoch` in one process, yielding once per training step
      (the step's loss); with `test`, the evaluating client evaluates and
      reports. The round's logs are then `coordinator.logs[epoch]`.
    - `evaluate(dataset) -> dict`: test figures of the newest model.
    - `checkpoints(**extra) -> {party: tf.train.Checkpoint}`, each holding
      only that party's own state (and the coordinator's with the server).
    - `byte_counts() -> {name: [bytes per client]}` and `optimizers`.
    """

    coordinator = None
    # True when one client trains at a time, so that a run can stop and
    # resume between two steps of a round (`round(..., skip=...)`).
    resumable_mid_round = False

    @property
    def epoch(self) -> int:
        """The round the run is at (rounds done)."""
        return int(self.coordinator.round.numpy())

    def round(self, epoch, client_datasets, test=None, skip=0):
        raise NotImplementedError

    def train_epoch(self, client_datasets) -> dict:
        """Trains one round on one dataset per client; returns its training logs."""
        epoch = self.epoch
        yield_all(self.round(epoch, client_datasets))
        return self.round_logs(epoch)[0]

    def round_logs(self, epoch: int) -> tuple[dict, dict]:
        """(training, validation) figures of a finished round."""
        return self.coordinator.logs[epoch]

    def evaluate(self, dataset) -> dict:
        raise NotImplementedError

    def byte_counts(self) -> dict:
        raise NotImplementedError

    def checkpoints(self, **extra) -> dict:
        raise NotImplementedError

    def resumed(self, epochs_done: int) -> None:
        """After a restore: rebuild what is not in the checkpoints."""
        del epochs_done

    def _check_count(self, client_datasets) -> list:
        client_datasets = list(client_datasets)
        if len(client_datasets) != self.num_clients:
            raise ValueError(
                f"got {len(client_datasets)} client datasets for "
                f"{self.num_clients} clients; pass one per client"
            )
        return client_datasets
