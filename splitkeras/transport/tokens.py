"""Client tokens: one random secret per client id, and secret files.

`tokens.json` maps each client id to its token. The host reads all of it;
client k needs only its own entry. A call's token (metadata) tells the host
which client is calling, with or without mutual TLS
(`splitkeras.transport.callers`).
"""

from __future__ import annotations

import json
import os
import secrets

__all__ = ["make_token", "read_tokens", "write_file", "write_tokens"]

CREDENTIALS_SCRIPT = "splitkeras make-credentials"


def write_file(path: str, data: bytes, mode: int) -> None:
    """Writes `data` to `path` with permissions `mode`, also when it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # os.open's mode only applies to new files.
        os.write(fd, data)
    finally:
        os.close(fd)


def make_token() -> str:
    """A fresh random client token (32 random bytes, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def write_tokens(path: str, num_clients: int) -> list[str]:
    """Writes one fresh token per client id to a JSON file (mode 0o600).

    The file maps client ids to tokens: `{"0": "...", "1": "...", ...}`. The
    server reads all of it; client k needs only its own token.

    Args:
        path: The JSON file to write (replaced if it exists).
        num_clients: How many clients (ids 0 .. num_clients - 1).

    Returns:
        The tokens, indexed by client id.
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    tokens = [make_token() for _ in range(num_clients)]
    text = json.dumps({str(k): t for k, t in enumerate(tokens)}, indent=2) + "\n"
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    write_file(path, text.encode("utf-8"), 0o600)
    return tokens


def read_tokens(path: str) -> dict[int, str]:
    """Reads a token file written by `write_tokens`.

    Args:
        path: The JSON file: an object mapping client ids ("0", "1", ...) to
            non-empty, distinct token strings.

    Returns:
        The tokens keyed by integer client id.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: The file is not such a JSON object.
    """
    expected = 'a JSON object {"0": "<token>", "1": "<token>", ...}'
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"token file {path} not found: create it with "
            f"`{CREDENTIALS_SCRIPT} --out=DIR` (it writes DIR/tokens.json)"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"token file {path} is not valid JSON ({e}); expected {expected}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"token file {path} holds a {type(data).__name__}; expected {expected}"
        )
    tokens: dict[int, str] = {}
    for key, token in data.items():
        if not (isinstance(key, str) and key.isdecimal()):
            raise ValueError(
                f"token file {path}: key {key!r} is not a client id "
                f"(a non-negative integer); expected {expected}"
            )
        if not isinstance(token, str) or not token:
            raise ValueError(
                f"token file {path}: the token of client {key} is not a "
                f"non-empty string; expected {expected}"
            )
        if int(key) in tokens:
            raise ValueError(f"token file {path}: client {int(key)} appears twice")
        tokens[int(key)] = token
    if len(set(tokens.values())) != len(tokens):
        raise ValueError(
            f"token file {path}: two clients share a token, so the server "
            "could not tell them apart"
        )
    return tokens
