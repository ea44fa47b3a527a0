"""What the federated baselines share: one server model, evaluated whole.

FedAvg and large-batch SGD train the whole, uncut model on every client; the
server holds the model that is evaluated. This base gives them the same
evaluation, byte reporting and experiment-runner interface.
"""

from __future__ import annotations

from splitkeras.objective import Objective
from splitkeras.parties.segment_step import compiled
from splitkeras.transport.counters import ByteCounters

__all__ = ["WholeModelBaseline"]


class WholeModelBaseline:
    """Base of the whole-model baselines.

    Subclasses call `_init_baseline` and define `served_model` (the model the
    server evaluates) and `checkpoint(**extra)`.
    """

    served_model = None

    def _init_baseline(self, num_clients: int, loss, metrics, jit_compile=False):
        self.objective = Objective(loss, metrics)
        self.counters = ByteCounters(("bytes_up", "bytes_down"), num_clients)
        self._evaluate_step = compiled(self._evaluate_batch, jit_compile=jit_compile)

    def _evaluate_batch(self, x, y):
        self.objective(y, self.served_model(x, training=False), training=False)

    def evaluate(self, dataset) -> dict:
        """The served model's mean loss and metrics on `dataset` of (x, y).

        The loss is the data loss only, as for every `Objective`: unlike
        `keras.Model.evaluate`, it leaves out regularization penalties.
        """
        self.objective.reset(training=False)
        for x, y in dataset:
            self._evaluate_step(x, y)
        return self.objective.result(training=False)

    def byte_counts(self) -> dict:
        """Bytes so far: {'bytes_up': [per client], 'bytes_down': [...]}."""
        return self.counters.as_dict()

    def checkpoints(self, **extra) -> dict:
        """{"server": checkpoint} with the byte counters (the runner's interface)."""
        return {"server": self.checkpoint(**extra, **self.counters.variables())}

    def resumed(self, epochs_done: int) -> None:
        """Nothing to rebuild: the checkpoint holds the whole state."""
        del epochs_done
