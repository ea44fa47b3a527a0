"""Who is calling a host: the client id and token in a call's metadata.

Each call carries `x-splitkeras-client` (its client id) and, where the host
has tokens, `x-splitkeras-token`. Under mutual TLS the client's certificate
names it too (common name "client-<id>", as `tls.write_credentials` makes
them), and the id in the metadata must be that one. A call without a valid
id, with a wrong token, from a certificate of another client, or whose body
speaks for another client is refused before anything in it is read further.
"""

from __future__ import annotations

import hmac

import grpc

__all__ = ["Refused", "authenticate", "certificate_names"]


class Refused(Exception):
    """A call is refused with `code` (a grpc.StatusCode) and `details`."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code = code
        self.details = details


def certificate_names(context) -> list:
    """The common names of the peer's certificate (mutual TLS), else []."""
    auth = context.auth_context() or {}
    return [n.decode(errors="replace") for n in auth.get("x509_common_name", [])]


def authenticate(
    metadata: dict, claimed: int, num_clients: int, tokens, names=()
) -> int:
    """The calling client's id.

    Args:
      metadata: the call's invocation metadata, as a dict.
      claimed: the client id the message body names.
      num_clients: K (valid ids are 0..K-1).
      tokens: {client id: token}, or None to accept any valid id.
      names: the common names of the caller's certificate (mutual TLS);
        empty when it presented none.

    Raises:
      Refused: UNAUTHENTICATED (no, bad or unknown id; wrong token; an id
        the tokens do not have) or PERMISSION_DENIED (a certificate of
        another client; the body speaks for another client).
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
    if names and f"client-{client}" not in names:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the certificate of {', '.join(names)} cannot call as client {client}",
        )
    if tokens is not None:
        token = metadata.get("x-splitkeras-token", "")
        expected = tokens.get(client)
        if expected is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"this host has no token for client {client}",
            )
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED, f"wrong token for client {client}"
            )
    if claimed != client:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"client {client} cannot speak for client {claimed}",
        )
    return client
