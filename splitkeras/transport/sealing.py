"""Client state handed on through the server: packed, then sealed.

A client's state (its segments' and optimizer's variables, in a fixed
order) travels as an .npz archive of positional arrays (`pack_arrays`),
sealed with AES-GCM under a key only the clients share (`seal`): the server
stores and forwards it without being able to read or alter it. Keras clients
and LiteRT edge clients use the same format, so they can hand state to each
other. numpy and cryptography only (no TensorFlow).
"""

from __future__ import annotations

import io
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "HandoffError",
    "Sealer",
    "handoff_header",
    "pack_arrays",
    "read_key",
    "seal",
    "unpack_arrays",
    "unseal",
    "write_key",
]


class HandoffError(RuntimeError):
    """A handed-off state could not be authenticated or does not fit."""


def pack_arrays(arrays) -> bytes:
    """`arrays` (in order) as the bytes of an .npz archive."""
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(a) for a in arrays])
    return buffer.getvalue()


def unpack_arrays(blob: bytes) -> list:
    """The arrays `pack_arrays` packed, in order (no pickled objects)."""
    archive = np.load(io.BytesIO(blob), allow_pickle=False)
    return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def seal(aead: AESGCM, header: str, plain: bytes) -> bytes:
    """Encrypts `plain` under `aead`; `header` travels in the clear, authenticated.

    The header binds the ciphertext to its sender, receiver and position in
    the sequence, so a relay cannot replay or redirect it unnoticed.
    """
    header = header.encode()
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, plain, header)
    return len(header).to_bytes(2, "big") + header + nonce + sealed


def unseal(aead: AESGCM, blob: bytes, receiver: str) -> tuple[str, bytes]:
    """(header, plaintext) of a `seal`ed blob; HandoffError if it fails."""
    size = int.from_bytes(blob[:2], "big")
    header, nonce, sealed = (
        blob[2 : 2 + size],
        blob[2 + size : 14 + size],
        blob[14 + size :],
    )
    try:
        plain = aead.decrypt(nonce, sealed, header)
    except (InvalidTag, ValueError):
        raise HandoffError(
            f"client-segment weights for {receiver} (header {header!r}) failed "
            "authentication: they were altered on the way or encrypted with "
            "another key."
        ) from None
    return header.decode(errors="replace"), plain


class Sealer:
    """Seals a client's state for another client, and opens what it receives.

    The authenticated header names the sender, the receiver and the round
    ("client 0 -> client 1, round 3"); `open` refuses a state sealed for
    another client. The server that relays it has no key: it can neither
    read nor alter it.

    Args:
      key: the clients' shared AES-256 key.
      client_id: this client's id.
    """

    def __init__(self, key: bytes, client_id: int):
        self._aead = AESGCM(key)
        self.client_id = client_id

    def seal(self, plain: bytes, to: int, round_index: int) -> bytes:
        header = handoff_header(self.client_id, to, round_index)
        return seal(self._aead, header, plain)

    def open_turn(self, blob: bytes, num_clients: int, round_index: int) -> bytes:
        """The plaintext of the state handed on to this client's turn of
        `round_index`: sealed for this client by the client before it in
        that round (the last client of the round before, for client 0).

        Raises:
          HandoffError: it fails authentication, was sealed for another
            client (redirected), or by another client or in another round
            (stale or replayed).
        """
        header, plain = self.open(blob)
        k = self.client_id
        sender = (k - 1) % num_clients
        expected = handoff_header(sender, k, round_index if k else round_index - 1)
        if header != expected:
            raise HandoffError(
                f"client {k} refuses the state handed to its turn of round "
                f"{round_index}: it is {header!r}, not {expected!r} (a stale or "
                "replayed state); it keeps its own"
            )
        return plain

    def open(self, blob: bytes) -> tuple[str, bytes]:
        """(header, plaintext) of a state sealed for this client.

        Raises:
          HandoffError: it fails authentication, or was sealed for another
            client.
        """
        header, plain = unseal(self._aead, blob, f"client {self.client_id}")
        receiver = (
            header.split("->", 1)[1].split(",", 1)[0].strip() if "->" in header else ""
        )
        if receiver != f"client {self.client_id}":
            raise HandoffError(
                f"client {self.client_id} received a state sealed for "
                f"{receiver or 'nobody'} (header {header!r}): it was redirected"
            )
        return header, plain


def handoff_header(sender: int, receiver: int, round_index: int) -> str:
    """The authenticated header of a state `sender` hands on to `receiver`
    at the end of its turn of round `round_index`."""
    return f"client {sender} -> client {receiver}, round {round_index}"


def write_key(path: str, key: bytes | None = None) -> bytes:
    """Writes the clients' AES-256 handoff key (a fresh one unless `key` is
    given) to `path`, mode 0600; returns it."""
    from splitkeras.transport.tokens import write_file

    key = AESGCM.generate_key(256) if key is None else key
    write_file(path, key.hex().encode(), 0o600)
    return key


def read_key(path: str) -> bytes:
    """The clients' handoff key written by `write_key`."""
    with open(path, "rb") as f:
        key = bytes.fromhex(f.read().decode().strip())
    if len(key) != 32:
        raise ValueError(f"{path}: expected a 256-bit key (64 hex digits)")
    return key
