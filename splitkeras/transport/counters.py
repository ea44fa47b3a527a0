"""Per-client byte counters kept as variables, so checkpoints keep them."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["ByteCounters"]


class ByteCounters:
    """Named byte counters, one int64 variable per client and name.

    Args:
      names: the counters, e.g. ("bytes_up", "bytes_down").
      num_clients: how many clients are counted.
    """

    def __init__(self, names, num_clients: int):
        self._vars = {
            name: [
                tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_{k}")
                for k in range(num_clients)
            ]
            for name in names
        }

    def add(self, name: str, client_id: int, nbytes) -> None:
        self._vars[name][client_id].assign_add(nbytes)

    def as_dict(self) -> dict:
        """{name: [bytes per client]} as Python ints."""
        return {
            name: [int(v.numpy()) for v in per_client]
            for name, per_client in self._vars.items()
        }

    def variables(self) -> dict:
        """{name_k: variable}, flat, for a checkpoint."""
        return {
            f"{name}_{k}": v
            for name, per_client in self._vars.items()
            for k, v in enumerate(per_client)
        }
