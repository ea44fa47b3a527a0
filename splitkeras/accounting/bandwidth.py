"""Bytes each client sends and receives, computed from the model and the cut.

For a model, a cut, a dataset size, a number of clients and epochs, this
gives each method's per-client traffic without training anything, counted as
the splitkeras transports count it (float32 tensors, int64 labels):

- split (round-robin SplitNN): per example, the cut tensors up with the
  label, their gradients down; one float32 loss down per batch; plus the
  client-segment handoff (weights and optimizer state) about once per epoch
  each way;
- splitfed (v1/v2): the same activations and gradients, plus the client
  segment's weights up and the average down once per round;
- fedavg: the whole model down and up once per round;
- large_batch_sgd: per step, the model down and its gradients (with the
  non-trainable statistics) up.

`experiment` runs measure the same quantities (`summary.json`'s
`per_client`), so computed and measured figures can be set side by side.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from splitkeras.cut import cut

__all__ = ["ClientBytes", "cut_bytes_per_example", "per_client_bytes", "crossover"]

FLOAT32 = 4
LABEL_BYTES = 8  # int64 labels travel with the cut tensors (vanilla)
LOSS_BYTES = 4  # the label holder reports one float32 loss per batch


@dataclasses.dataclass(frozen=True)
class ClientBytes:
    """One client's traffic over a whole run, in bytes."""

    up: int
    down: int
    weights: int = 0  # handoff or averaging traffic, both ways, included above

    @property
    def total(self) -> int:
        return self.up + self.down


def _elements(shape) -> int:
    return int(np.prod([d for d in shape[1:]]))


def cut_bytes_per_example(model: keras.Model, at) -> int:
    """Float32 bytes of every tensor that crosses the (first) cut, per example."""
    client = cut(model, at).client
    return sum(_elements(t.shape) * FLOAT32 for t in client.outputs)


def _weight_bytes(weights) -> int:
    return sum(int(np.prod(w.shape)) * FLOAT32 for w in weights)


def per_client_bytes(
    method: str,
    model: keras.Model,
    at,
    num_examples: int,
    num_clients: int,
    epochs: int,
    batch_size: int,
    optimizer_slots: int = 2,
) -> ClientBytes:
    """The average client's bytes for `method` over `epochs`.

    Args:
      method: "split", "splitfed", "fedavg" or "large_batch_sgd".
      model: the uncut model.
      at: the cut layer (split methods only).
      num_examples: training examples in all, shared equally by the clients.
      num_clients: K.
      epochs: passes over the data (rounds for FedAvg / SplitFed).
      batch_size: examples per step.
      optimizer_slots: optimizer variables per weight handed on with the
        round-robin state (Adam: 2, SGD with momentum: 1, plain SGD: 0).

    Returns:
      `ClientBytes`, averaged over clients.
    """
    n = num_examples / num_clients
    steps = math.ceil(n / batch_size)
    if method in ("split", "splitfed"):
        activation = cut_bytes_per_example(model, at)
        up = epochs * n * (activation + LABEL_BYTES)
        down = epochs * (n * activation + steps * LOSS_BYTES)
        segment = cut(model, at).client
        if method == "split":
            # Handed on about once per epoch per client, each way.
            state = _weight_bytes(segment.weights) + optimizer_slots * _weight_bytes(
                segment.trainable_weights
            )
            weights = epochs * state
        else:
            weights = epochs * _weight_bytes(segment.weights)
        return ClientBytes(
            round(up + weights), round(down + weights), round(2 * weights)
        )
    if method == "fedavg":
        model_bytes = epochs * _weight_bytes(model.weights)
        return ClientBytes(model_bytes, model_bytes, 2 * model_bytes)
    if method == "large_batch_sgd":
        per_step = _weight_bytes(model.weights)
        return ClientBytes(epochs * steps * per_step, epochs * steps * per_step)
    raise ValueError(
        f"unknown method {method!r}; choose split, splitfed, fedavg or large_batch_sgd"
    )


def crossover(model, at, num_examples, epochs, batch_size, max_clients=10**7):
    """The smallest number of clients at which split sends less than FedAvg.

    Returns None if split never sends less up to `max_clients`.
    """

    def split_total(k):
        return per_client_bytes(
            "split", model, at, num_examples, k, epochs, batch_size
        ).total

    fedavg_total = per_client_bytes(
        "fedavg", model, at, num_examples, 1, epochs, batch_size
    ).total
    if split_total(max_clients) >= fedavg_total:
        return None
    low, high = 1, max_clients  # split's bytes per client fall as k grows
    while low < high:
        mid = (low + high) // 2
        if split_total(mid) < fedavg_total:
            high = mid
        else:
            low = mid + 1
    return low
