"""Handing client-segment weights from one client to the next.

In round-robin split learning (SplitNN) client k+1 starts from the client
segment that client k finished with. Two ways, as in the seed paper:

- `peer`: client k sends its segment state straight to client k+1;
- `server`: client k uploads it to the server, which stores and forwards it
  but cannot read it: it is encrypted and authenticated with AES-GCM under a
  key that only the clients share.

The state is every variable of the client's segments (weights, batch-norm
statistics, dropout seed states) and of its optimizer, so the next client
continues exactly where the previous one stopped. Bytes are counted per
client, apart from activation and gradient bytes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras.transport.sealing import (
    HandoffError,
    pack_arrays,
    seal,
    unpack_arrays,
    unseal,
)

__all__ = [
    "HandoffError",
    "seal",
    "unseal",
    "PeerHandoff",
    "ServerRelayHandoff",
    "WeightRelay",
    "make_handoff",
    "pack_state",
    "unpack_state",
]

HANDOFF_MODES = ("peer", "server")


def _state_variables(client) -> list:
    segments = [s for s in (client.segment, client.tail) if s is not None]
    return [v for s in segments for v in s.variables] + list(client.optimizer.variables)


def pack_state(client) -> bytes:
    """Serializes a client's segment and optimizer state to bytes."""
    return pack_arrays([np.asarray(v.numpy()) for v in _state_variables(client)])


def unpack_state(client, blob: bytes) -> None:
    """Loads a state made by `pack_state` into `client` (same architecture)."""
    arrays = unpack_arrays(blob)
    variables = _state_variables(client)
    if len(arrays) != len(variables):
        raise HandoffError(
            f"handed-off state has {len(arrays)} arrays but client "
            f"{client.client_id} has {len(variables)} variables: the clients' "
            "segments or optimizers differ."
        )
    for i, variable in enumerate(variables):
        value = arrays[i]
        if tuple(value.shape) != tuple(variable.shape):
            raise HandoffError(
                f"handed-off variable {i} ({variable.path}) has shape "
                f"{value.shape}, client {client.client_id} expects {variable.shape}"
            )
        variable.assign(value)


class _Counters:
    """Handoff bytes per client, as variables so that checkpoints keep them."""

    def __init__(self, num_clients):
        def counter():
            return tf.Variable(0, dtype=tf.int64, trainable=False)

        self.sent = [counter() for _ in range(num_clients)]
        self.received = [counter() for _ in range(num_clients)]

    def as_dict(self) -> dict:
        return {
            "handoff_bytes_sent": [int(v.numpy()) for v in self.sent],
            "handoff_bytes_received": [int(v.numpy()) for v in self.received],
        }

    def of(self, client_id: int) -> dict:
        """One client's counters, for its checkpoint."""
        return {
            "handoff_bytes_sent": self.sent[client_id],
            "handoff_bytes_received": self.received[client_id],
        }


class PeerHandoff:
    """Client k sends its state straight to client k+1."""

    mode = "peer"

    def __init__(self, num_clients):
        self.counters = _Counters(num_clients)

    def transfer(self, source, destination) -> None:
        blob = pack_state(source)
        self.counters.sent[source.client_id].assign_add(len(blob))
        self.counters.received[destination.client_id].assign_add(len(blob))
        unpack_state(destination, blob)


class WeightRelay:
    """The server's side of a `server` handoff: stores and forwards blobs.

    It holds only ciphertext; it has no key.
    """

    def __init__(self):
        self.stored = {}

    def upload(self, destination_id: int, blob: bytes) -> None:
        self.stored[destination_id] = blob

    def fetch(self, destination_id: int) -> bytes:
        if destination_id not in self.stored:
            raise HandoffError(f"no weights stored for client {destination_id}")
        return self.stored.pop(destination_id)


class ServerRelayHandoff:
    """Client k uploads its encrypted state to the server for client k+1.

    Args:
      num_clients: the number of clients.
      relay: the server's `WeightRelay`.
      key: the AES-256 key the clients share (the server never has it);
        None draws a fresh one for this in-process simulation.
    """

    mode = "server"

    def __init__(self, num_clients, relay: WeightRelay, key: bytes | None = None):
        self.counters = _Counters(num_clients)
        self.relay = relay
        self._aead = AESGCM(key if key is not None else AESGCM.generate_key(256))
        self._sequence = 0

    def upload(self, source, destination_id: int) -> None:
        """Client `source` encrypts its state and sends it to the server."""
        self._sequence += 1
        header = f"{source.client_id}->{destination_id}#{self._sequence}"
        blob = seal(self._aead, header, pack_state(source))
        self.relay.upload(destination_id, blob)
        self.counters.sent[source.client_id].assign_add(len(blob))

    def download(self, destination) -> None:
        """Client `destination` fetches, authenticates and loads its state."""
        blob = self.relay.fetch(destination.client_id)
        self.counters.received[destination.client_id].assign_add(len(blob))
        _, plain = unseal(self._aead, blob, f"client {destination.client_id}")
        unpack_state(destination, plain)

    def transfer(self, source, destination) -> None:
        self.upload(source, destination.client_id)
        self.download(destination)


def make_handoff(mode: str, num_clients: int, relay=None, key=None):
    """The handoff for `mode` ("peer" or "server")."""
    if mode == "peer":
        return PeerHandoff(num_clients)
    if mode == "server":
        return ServerRelayHandoff(num_clients, relay or WeightRelay(), key)
    raise ValueError(
        f"unknown weight handoff {mode!r}; choose one of {', '.join(HANDOFF_MODES)}"
    )
