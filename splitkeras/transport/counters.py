"""Bytes counted per client and per kind of traffic, as checkpointable variables."""

from __future__ import annotations

import tensorflow as tf

from splitkeras.protocol import Kind

__all__ = ["ByteCounters", "CATEGORIES", "category"]

# What a message's bytes count as, by kind: (sent by the client, received by
# it). Steps count as activations up and gradients down.
CATEGORIES = {
    "data": ("bytes_up", "bytes_down"),
    "handoff": ("handoff_bytes_sent", "handoff_bytes_received"),
    "aggregation": ("aggregation_bytes_sent", "aggregation_bytes_received"),
    "alignment": ("alignment_bytes_sent", "alignment_bytes_received"),
}
_KINDS = {
    Kind.BEGIN: "handoff",
    Kind.END: "handoff",
    Kind.HANDOFF: "handoff",
    Kind.WEIGHTS: "aggregation",
    Kind.FETCH: "aggregation",
    Kind.UPDATE: "aggregation",
    Kind.PSI: "alignment",
}


def category(kind, overrides=None) -> str:
    """The traffic category of a message kind ("data" for steps)."""
    kind = Kind(kind)
    if overrides and kind in overrides:
        return overrides[kind]
    return _KINDS.get(kind, "data")


class ByteCounters:
    """Named byte counters, one int64 variable per client and name.

    Args:
      names: the counters, e.g. ("bytes_up", "bytes_down").
      num_clients: how many clients are counted.
    """

    def __init__(self, names, num_clients: int):
        self.num_clients = num_clients
        self._vars = {
            name: [
                tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_{k}")
                for k in range(num_clients)
            ]
            for name in names
        }

    @classmethod
    def for_categories(cls, categories, num_clients: int) -> ByteCounters:
        """Counters for both directions of every category in `categories`."""
        return cls([n for c in categories for n in CATEGORIES[c]], num_clients)

    @property
    def names(self) -> list:
        return list(self._vars)

    def counts(self, name: str) -> bool:
        return name in self._vars

    def add(self, name: str, client_id: int, nbytes) -> None:
        if not 0 <= client_id < self.num_clients:
            raise ValueError(
                f"client id {client_id} is not counted here (clients "
                f"0..{self.num_clients - 1})"
            )
        self._vars[name][client_id].assign_add(tf.cast(nbytes, tf.int64))

    def as_dict(self) -> dict:
        """{name: [bytes per client]} as Python ints."""
        return {
            name: [int(v.numpy()) for v in per_client]
            for name, per_client in self._vars.items()
        }

    def of(self, client_id: int) -> dict:
        """One client's counters {name: variable}, for its checkpoint."""
        return {name: per_client[client_id] for name, per_client in self._vars.items()}

    def variables(self) -> dict:
        """{name_k: variable}, flat, for a checkpoint."""
        return {
            f"{name}_{k}": v
            for name, per_client in self._vars.items()
            for k, v in enumerate(per_client)
        }
