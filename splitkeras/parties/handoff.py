"""A client's whole state as bytes, for handing it to the next client.

In round-robin split learning (SplitNN) client k+1 starts from the client
state that client k finished with. The state is every variable of the
client's segments (weights, batch-norm statistics, dropout seed states) and
of its optimizer, in a fixed order, so the next client continues exactly
where the previous one stopped. It travels sealed (`transport.sealing`),
in a HANDOFF message to the next client ("peer") or through the
coordinator ("server"), see `splitkeras.transport.turns`.
"""

from __future__ import annotations

import numpy as np

from splitkeras.transport.sealing import HandoffError, pack_arrays, unpack_arrays

__all__ = ["HandoffError", "pack_state", "state_variables", "unpack_state"]


def state_variables(client) -> list:
    """The variables a client hands on, in their fixed order."""
    segments = [s for s in (client.segment, client.tail) if s is not None]
    return [v for s in segments for v in s.variables] + list(client.optimizer.variables)


def pack_state(client) -> bytes:
    """Serializes a client's segment and optimizer state to bytes."""
    return pack_arrays([np.asarray(v.numpy()) for v in state_variables(client)])


def unpack_state(client, blob: bytes) -> None:
    """Loads a state made by `pack_state` into `client` (same architecture)."""
    arrays = unpack_arrays(blob)
    variables = state_variables(client)
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
