"""What the federated baselines share: clients that hold the whole model.

FedAvg and large-batch SGD train the whole, uncut model on every client;
their server holds the model that is served. Each client is a
`ModelClient`: its own copy of the model, a compiled step, and its
evaluation (the evaluating client evaluates its copy, which holds the
server's model once fetched, and reports). The schedules give it the same
evaluation, byte reporting and runner interface.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from splitkeras.objective import Objective
from splitkeras.parties.segment_step import compiled
from splitkeras.protocol import Kind, Message
from splitkeras.schedules.base import Schedule

__all__ = ["ModelClient", "WholeModelBaseline", "check_float_weights"]


def check_float_weights(model, what: str) -> None:
    """Refuses a model with weights that cannot be averaged."""
    if not model.weights:
        raise ValueError(
            f"model {model.name!r} from build_model has no weights; return a "
            "built model (e.g. a functional model on keras.Input)"
        )
    other = [w.path for w in model.weights if not keras.backend.is_float_dtype(w.dtype)]
    if other:
        raise ValueError(
            f"{what} averages weights, but {other} of model {model.name!r} are "
            "not floating point"
        )


class ModelClient:
    """A client holding a copy of the whole model, written against its link.

    Args:
      client_id: its id.
      model: its copy of the model.
      optimizer: its optimizer (None where the server optimizes).
      objective: its loss and running metrics.
      link: to the server (through the coordinator).
      jit_compile: compile its steps with XLA.
    """

    def __init__(self, client_id, model, optimizer, objective, link, jit_compile=False):
        self.client_id = client_id
        self.model = model
        self.optimizer = optimizer
        self.objective = objective
        self.link = link
        self._eval = compiled(self._evaluate_batch, jit_compile=jit_compile)
        self.leakage = None

    def _message(self, kind, epoch, step=0, **fields) -> Message:
        return Message(kind, self.client_id, step, round=epoch, **fields)

    def begin(self, epoch: int, batches: int):
        """Begins round `epoch` (after the last one ended), with its batch count."""
        return self.link.poll(self._message(Kind.BEGIN, epoch, count=batches)).status

    def end(self, epoch: int, examples: int) -> None:
        metrics = {k: float(v) for k, v in self.objective.result(training=True).items()}
        self.link.request(
            self._message(Kind.END, epoch, count=examples, metrics=metrics)
        )

    def load(self, reply) -> None:
        """The model (or average) a FETCH brought."""
        for variable, value in zip(self.model.weights, reply.tensors):
            variable.assign(value)

    def report(self, epoch: int, test) -> None:
        """Evaluates this client's copy on `test` and REPORTs it."""
        figures = self.evaluate(test)
        self.link.poll(self._message(Kind.REPORT, epoch, metrics=figures))

    def _evaluate_batch(self, x, y):
        self.objective(y, self.model(x, training=False), None, False)

    def evaluate(self, dataset) -> dict:
        """This copy's mean loss and metrics on `dataset`: the data loss only
        (as for every `Objective`, without regularization penalties)."""
        self.objective.reset(training=False)
        for x, y in dataset:
            self._eval(x, y)
        return self.objective.result(training=False)


class WholeModelBaseline(Schedule):
    """Base of the whole-model baselines run in one process.

    Subclasses set `programs`, `served_model`, `counters`, `coordinator`
    and define `checkpoint(**extra)`.
    """

    served_model = None

    def _init_evaluation(self, loss, metrics, jit_compile=False):
        self.objective = Objective(loss, metrics)
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
        """The server's checkpoint (model, round position, byte counters) and
        each client's (its copy and optimizer)."""
        parties = {
            f"client_{p.client_id}": self._client_checkpoint(p, extra)
            for p in self.programs
        }
        parties["server"] = self.checkpoint(
            **extra,
            **self.counters.variables(),
            coordinator=tf.train.Checkpoint(**self.coordinator.trackables()),
        )
        return parties

    @staticmethod
    def _client_checkpoint(program, extra):
        from splitkeras.checkpointing import party_checkpoint

        return party_checkpoint([program.model], program.optimizer, **extra)

    def _check_count(self, items, what="client datasets") -> list:
        items = list(items)
        if len(items) != self.num_clients:
            raise ValueError(
                f"got {len(items)} {what} for {self.num_clients} clients; "
                "pass one per client"
            )
        return items
