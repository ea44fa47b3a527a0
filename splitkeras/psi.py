"""Private set intersection: align vertically split samples, ids kept secret.

In vertical split learning each party holds other features of the same
samples, under its own sample ids. Before training they must agree on the
samples all of them hold, without revealing any other id and without ids
ever travelling in clear. This is elliptic-curve Diffie-Hellman PSI over
X25519:

1. each party hashes its ids to Curve25519 points (`hash_ids`) and blinds
   them with its secret scalar (`Blinder.blind`);
2. each list then passes every other party once, in a ring; each applies
   its secret and keeps the order. Scalar multiplication commutes, so once
   all secrets are applied, equal ids give equal 32-byte values;
3. a coordinator matches the fully blinded lists (`intersection_rows`) and
   tells each party which of its rows to use, in the leader's order.

`align_in_memory` runs all of it in one process. The parties are assumed
honest but curious. The coordinator learns each list's size and which rows of
two or more lists match (also rows of two parties that the others lack), never
an id. numpy, hashlib and cryptography only (no TensorFlow).
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

__all__ = ["Blinder", "align_in_memory", "hash_ids", "intersection_rows"]

_DOMAIN = b"splitkeras.psi.v1/"  # lists hashed under other tags never match
_P = 2**255 - 19  # Curve25519's field: v^2 = u^3 + A u^2 + u (mod P)
_A = 486662
_INT64 = (-(2**63), 2**63)


def _id_bytes(value) -> bytes:
    """The canonical bytes of one id; a type tag keeps 7, '7' and b'7' apart."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"id {value!r} is a bool; ids are ints, str or bytes")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if not _INT64[0] <= value < _INT64[1]:
            raise ValueError(f"id {value} does not fit in int64; use a str id")
        return b"i" + value.to_bytes(8, "little", signed=True)
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, bytes):
        return b"b" + value
    raise TypeError(
        f"id {value!r} of type {type(value).__name__} is not an int, str or "
        "bytes; cast the ids (e.g. float ids to int) before the PSI"
    )


def _jacobi(a: int, n: int = _P) -> int:
    """The Jacobi symbol (a/n), n odd: 1 for a nonzero square mod prime n."""
    a, sign = a % n, 1
    while a:
        zeros = (a & -a).bit_length() - 1
        a >>= zeros
        if zeros & 1 and n & 7 in (3, 5):
            sign = -sign
        if a & 3 == 3 and n & 3 == 3:
            sign = -sign
        a, n = n % a, a
    return sign if n == 1 else 0


def _hash_to_curve(data: bytes) -> bytes:
    """u-coordinate of a Curve25519 point derived from `data` (try and increment).

    A u that is not on the curve lies on its twist; blinding keeps it there,
    and anyone can tell the curve from the twist, so a raw hash would leak one
    bit of every id. Hashes off the curve are redrawn (two tries on average).
    """
    for counter in itertools.count():
        u = bytearray(
            hashlib.sha256(_DOMAIN + counter.to_bytes(4, "little") + data).digest()
        )
        u[31] &= 0x7F  # X25519 ignores bit 255 (RFC 7748): keep one encoding
        x = int.from_bytes(u, "little")
        if x < _P and _jacobi(x * (x * x + _A * x + 1)) == 1:
            return bytes(u)


def hash_ids(ids) -> np.ndarray:
    """Hashes each id to an X25519 u-coordinate of a point on Curve25519.

    Args:
        ids: a 1-D sequence of ids: a numpy int array, a list of ints (int64
            range), of str or of bytes. The int 7, the str '7' and the bytes
            b'7' are different ids.

    Returns:
        uint8 array [n, 32], row i the point of `ids[i]`.

    Raises:
        TypeError: an id is not an int, str or bytes.
        ValueError: `ids` is not 1-D, or an int id does not fit in int64.
    """
    if isinstance(ids, (str, bytes)) or np.ndim(ids) != 1:
        raise ValueError(
            f"ids must be a 1-D sequence of ids, got {type(ids).__name__} "
            f"of shape {np.shape(ids)}; pass a list or a 1-D array"
        )
    joined = b"".join(_hash_to_curve(_id_bytes(value)) for value in ids)
    return np.frombuffer(bytearray(joined), np.uint8).reshape(-1, 32)


def _check_points(points, what: str) -> np.ndarray:
    """`points` as a contiguous uint8 [n, 32] array, or a ValueError saying why."""
    if not (
        isinstance(points, np.ndarray)
        and points.dtype == np.uint8
        and points.ndim == 2
        and points.shape[1] == 32
    ):
        got = (
            f"a {points.dtype} array of shape {points.shape}"
            if isinstance(points, np.ndarray)
            else f"a {type(points).__name__}"
        )
        raise ValueError(
            f"{what} must be a uint8 array of shape [n, 32] (from hash_ids or "
            f"Blinder.blind), got {got}"
        )
    return np.ascontiguousarray(points)


class Blinder:
    """One party's secret X25519 scalar, which blinds lists of points.

    Args:
        secret: 32 bytes; None draws them from `os.urandom`. X25519 clamps
            the scalar, so inputs off the prime-order group reveal nothing.

    Raises:
        TypeError: `secret` is not bytes.
        ValueError: `secret` is not 32 bytes long.
    """

    def __init__(self, secret: bytes | None = None):
        if secret is None:
            secret = os.urandom(32)
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"a Blinder secret is bytes, got {type(secret).__name__}")
        if len(secret) != 32:
            raise ValueError(
                f"a Blinder secret is 32 bytes, got {len(secret)}; pass "
                "os.urandom(32), or None to draw one"
            )
        self._secret = bytes(secret)
        self._key = X25519PrivateKey.from_private_bytes(self._secret)

    @property
    def secret(self) -> bytes:
        """The 32 secret bytes: they must never leave their party."""
        return self._secret

    def __repr__(self) -> str:
        return "Blinder(secret=<hidden>)"

    def blind(self, points: np.ndarray) -> np.ndarray:
        """Multiplies every point by this party's secret scalar, order kept.

        Args:
            points: uint8 [n, 32], from `hash_ids` or another party's `blind`.

        Returns:
            uint8 [n, 32], row i the blinded `points[i]`.

        Raises:
            ValueError: `points` is not uint8 [n, 32], or a row is a low-order
                point (it was not made by `hash_ids` and `blind`).
        """
        raw = _check_points(points, "points").tobytes()
        blinded = []
        for row in range(len(raw) // 32):
            point = X25519PublicKey.from_public_bytes(raw[32 * row : 32 * row + 32])
            try:
                blinded.append(self._key.exchange(point))
            except ValueError:  # the all-zero result of a low-order point
                raise ValueError(
                    f"points[{row}] is a low-order point, not a hashed id: "
                    "every list must come from hash_ids, then Blinder.blind"
                ) from None
        return np.frombuffer(bytearray(b"".join(blinded)), np.uint8).reshape(-1, 32)


def _check_leader(leader, parties) -> None:
    if leader not in parties:
        raise ValueError(
            f"leader {leader!r} is not among the parties {list(parties)}; "
            "pass the name of the party whose row order is canonical"
        )


def _positions(party, points) -> dict:
    """{blinded value: row} of one party's list; a repeated value is an error."""
    raw = _check_points(points, f"fully_blinded[{party!r}]").tobytes()
    positions = {}
    for row in range(len(raw) // 32):
        first = positions.setdefault(raw[32 * row : 32 * row + 32], row)
        if first != row:
            raise ValueError(
                f"party {party!r} holds the same id at rows {first} and {row}; "
                "ids must be unique: keep one row per sample before the PSI"
            )
    return positions


def intersection_rows(fully_blinded: dict, leader) -> dict:
    """Aligns the parties' rows on the samples they all hold.

    Args:
        fully_blinded: {party: uint8 [n_party, 32]}, each party's own ids in
            its own row order, blinded by every party's secret.
        leader: the party whose row order is canonical (the label holder).

    Returns:
        {party: int64 array rows}: `rows[j]` is the row, in that party's own
        data, of the j-th common sample, in the leader's row order. So
        `rows[leader]` increases, and `ids_k[rows_k[j]]` is one id for all k.

    Raises:
        ValueError: the leader is not a party, a list is not uint8 [n, 32],
            a party's list repeats a value (a duplicate id), or the parties
            share no sample.
    """
    _check_leader(leader, fully_blinded)
    positions = {p: _positions(p, points) for p, points in fully_blinded.items()}
    common = [
        k for k in positions[leader] if all(k in pos for pos in positions.values())
    ]
    if not common:
        sizes = {party: len(pos) for party, pos in positions.items()}
        raise ValueError(
            f"the parties share no sample (ids per party: {sizes}); check that "
            "they encode ids alike (the int 7 and the str '7' differ)"
        )
    return {
        party: np.fromiter((pos[k] for k in common), np.int64, len(common))
        for party, pos in positions.items()
    }


def align_in_memory(ids_per_party: dict, leader, secrets: dict | None = None) -> dict:
    """Runs the whole PSI in one process, as the parties would over a network.

    Each party hashes and blinds its ids; each list then passes every other
    party once, in a ring (each applies its secret, keeping the order); and
    `intersection_rows` aligns the fully blinded lists.

    Args:
        ids_per_party: {party: ids}, ids as `hash_ids` takes them.
        leader: the party whose row order is canonical (the label holder).
        secrets: {party: 32 bytes} for every party; None draws fresh ones.

    Returns:
        {party: int64 rows}, as `intersection_rows` returns.

    Raises:
        ValueError: as `intersection_rows`, `hash_ids` and `Blinder`, or
            `secrets` does not name exactly the parties.
    """
    parties = list(ids_per_party)
    _check_leader(leader, parties)
    if secrets is not None and set(secrets) != set(parties):
        raise ValueError(
            f"secrets are for {list(secrets)} but the parties are {parties}; "
            "give every party one secret, or pass secrets=None"
        )
    blinders = {p: Blinder(None if secrets is None else secrets[p]) for p in parties}
    fully_blinded = {}
    for start, owner in enumerate(parties):
        points = hash_ids(ids_per_party[owner])
        for step in range(len(parties)):  # the owner first, then the ring
            points = blinders[parties[(start + step) % len(parties)]].blind(points)
        fully_blinded[owner] = points
    return intersection_rows(fully_blinded, leader)
