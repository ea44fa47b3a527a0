"""Who is calling a host: the client id and token in a call's metadata.

Each call carries `x-splitkeras-client` (its client id) and, where the host
has tokens, `x-splitkeras-token`. A call without a valid id, with a wrong
token, or whose body speaks for another client is refused before anything
in it is read further.
"""

from __future__ import annotations

import hmac

import grpc

__all__ = ["Refused", "authenticate"]


class Refused(Exception):
    """A call is refused with `code` (a grpc.StatusCode) and `details`."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code = code
        self.details = details


def authenticate(metadata: dict, claimed: int, num_clients: int, tokens) -> int:
    """The calling client's id.

    Args:
      metadata: the call's invocation metadata, as a dict.
      claimed: the client id the message body names.
      num_clients: K (valid ids are 0..K-1).
      tokens: {client id: token}, or None to accept any valid id.

    Raises:
      Refused: UNAUTHENTICATED (no, bad or unknown id; wrong token) or
        PERMISSION_DENIED (the body speaks for another client).
    """
    raw = metadata.get("x-splitkeras-client", "")
    try:
        client = int(raw)
    except ValueError:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"missing or malformed client id metadata {raw!r}",
        ) from None
    if not 0 <= client < num_clients:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"unknown client {client}: this host serves clients 0..{num_clients - 1}",
        )
    if tokens is not None:
        token = metadata.get("x-splitkeras-token", "")
        if not hmac.compare_digest(token.encode(), tokens[client].encode()):
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED, f"wrong token for client {client}"
            )
    if claimed != client:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"client {client} cannot speak for client {claimed}",
        )
    return client
