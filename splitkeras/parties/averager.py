"""The averaging party: SplitFed's fed server and FedAvg's server.

Each round every client uploads its weights with the number of examples it
trained on (WEIGHTS); once all have, the averager computes their average
weighted by examples, and every client fetches it (FETCH, answered with
WEIGHTS). It sees weights and counts only. Uploads arrive in any order; the
average is computed in client order, so it is the same in one process and
across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from splitkeras.protocol import Kind, Message, Rejected, Status

__all__ = ["Averager", "weight_specs", "weighted_average"]


def weight_specs(variables) -> list:
    """[(dtype, shape)] of weights, as they travel."""
    return [(tf.as_dtype(v.dtype), [int(d) for d in v.shape]) for v in variables]


def weighted_average(weight_lists, examples: Sequence[int]) -> list[np.ndarray]:
    """Per weight, sum_k n_k w_k / sum_k n_k, accumulated in float64.

    Args:
      weight_lists: per party, its weights (arrays or tensors), in the same
        order and shapes for every party.
      examples: n_k per party.

    Returns:
      The averaged weights, in the parties' dtypes. A weight that every party
      holds with the same value comes back bit-identical.
    """
    total = sum(examples)
    average = []
    for i, first in enumerate(weight_lists[0]):
        acc = np.zeros(tuple(first.shape), np.float64)
        for weights, n in zip(weight_lists, examples):
            if n:
                acc += n * np.asarray(weights[i], np.float64)
        dtype = np.dtype(getattr(first.dtype, "as_numpy_dtype", first.dtype))
        average.append((acc / total).astype(dtype))
    return average


class Averager:
    """Averages the clients' uploads of each round; answers FETCH with the average.

    Args:
      num_clients: K; a round's average waits for all K uploads.
      variables: where the average goes: the weights of the model it
        serves (FedAvg's global model, which then also answers a FETCH of
        round -1 with its initial weights), or [(dtype, shape)] specs (the
        averager keeps variables of its own; round -1 has no answer).
      local_epochs: FedAvg's local passes per round: a client that ends a
        round has trained the batches it said at BEGIN this many times
        (`steps_per_batch`, read by its `Rounds` for its step count, on a
        host and in one process). 0: not counted here (SplitFed's main
        server counts its clients' steps).
    """

    def __init__(self, num_clients: int, variables, local_epochs: int = 0):
        self.num_clients = num_clients
        self.steps_per_batch = int(local_epochs)
        variables = list(variables)
        self.has_initial = bool(variables) and not isinstance(variables[0], tuple)
        if self.has_initial:
            self.average = variables
            self.specs = weight_specs(variables)
        else:
            self.specs = [(tf.as_dtype(d), list(s)) for d, s in variables]
            self.average = [
                tf.Variable(tf.zeros(shape, dtype), trainable=False)
                for dtype, shape in self.specs
            ]
        # The last round averaged (-1: none yet).
        self.averaged = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self._uploads = {}  # client -> (arrays, examples) of the open round

    def trackables(self) -> dict:
        named = {f"average_{i}": v for i, v in enumerate(self.average)}
        return {**named, "averaged": self.averaged}

    def rounds_averaged(self) -> int:
        return int(self.averaged.numpy()) + 1

    def rolled_back(self) -> None:
        self._uploads.clear()

    def arrival_specs(self, kind, client_id: int) -> list:
        return [(d, [s for s in shape]) for d, shape in self.specs]

    def handle(self, message: Message) -> Message:
        if message.kind == Kind.WEIGHTS:
            return self._upload(message)
        if message.kind == Kind.FETCH:
            return self._fetch(message)
        raise Rejected(
            "invalid", f"the averager takes WEIGHTS and FETCH, not {message.kind.name}"
        )

    def _upload(self, message):
        r, k = int(message.round), message.client_id
        done = int(self.averaged.numpy())
        if r <= done:  # a round redone after a restart: its average stands
            return _ack(message)
        if r != done + 1:
            raise Rejected(
                "restart",
                f"client {k} uploads weights of round {r}; the averager is at "
                f"round {done + 1}",
            )
        if len(message.tensors) != len(self.specs):
            raise Rejected(
                "invalid",
                f"client {k} uploaded {len(message.tensors)} weights, the "
                f"averager expects {len(self.specs)}",
            )
        self._uploads[k] = (
            [np.asarray(t) for t in message.tensors],
            int(message.count),
        )
        if len(self._uploads) == self.num_clients:
            self._average(r)
        return _ack(message)

    def _average(self, r: int) -> None:
        ids = sorted(self._uploads)
        uploads = [self._uploads[k] for k in ids]
        examples = [n for _, n in uploads]
        if sum(examples) == 0:
            self._uploads.clear()
            raise ValueError(
                f"no client has any example this round (examples per client: "
                f"{examples}); pass non-empty client datasets"
            )
        average = weighted_average([w for w, _ in uploads], examples)
        for variable, value in zip(self.average, average):
            variable.assign(value)
        self.averaged.assign(r)
        self._uploads.clear()

    def _fetch(self, message):
        r = int(message.round)
        done = int(self.averaged.numpy())
        if r > done:
            return Message(Kind.WEIGHTS, message.client_id, round=r, status=Status.WAIT)
        if r < done or (r == -1 and not self.has_initial):
            raise Rejected(
                "restart",
                f"client {message.client_id} fetches the average of round {r}; "
                f"the averager holds round {done}'s",
            )
        return Message(
            Kind.WEIGHTS,
            message.client_id,
            round=r,
            tensors=tuple(tf.identity(v) for v in self.average),
        )


def _ack(message) -> Message:
    return Message(Kind.ACK, message.client_id, message.step, round=message.round)
