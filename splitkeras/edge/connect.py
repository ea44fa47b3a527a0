"""An `EdgeClient` from the files a device holds: the exported model, its
edge.json, the data, TLS certificates and tokens (what `splitkeras edge-client`
and `splitkeras predict` share). numpy only."""

from __future__ import annotations

import os

from splitkeras.edge.client import EdgeClient, load_client_data
from splitkeras.edge.spec import EdgeSpec
from splitkeras.transport import tls
from splitkeras.transport.tokens import read_tokens

__all__ = ["connect"]


def connect(
    model: str,
    server: str,
    client_id: int = 0,
    *,
    key: bytes | None = None,
    spec_path: str | None = None,
    data: str | None = None,
    tls_dir: str | None = None,
    mutual_tls: bool = False,
    token_file: str | None = None,
    num_threads: int | None = None,
    max_message_mb: int | None = None,
    timeout_seconds: float | None = None,
    retry_seconds: float | None = None,
):
    """Joins `server` with an exported segment; returns (client, test split).

    Args:
      model: the exported .tflite.
      server: the server's "host:port".
      client_id: this client's id (its shard of the run's partition).
      key: the clients' handoff key: the client takes training turns with it
        (None: split inference only).
      spec_path: edge.json (None: the one next to `model`).
      data: IDX folder or .npz file (None: edge.json's data path).
      tls_dir: directory holding ca.pem: connect over TLS (None: plaintext).
      mutual_tls: present this client's certificate (from `tls_dir`).
      token_file: tokens.json holding this client's token.
      num_threads: LiteRT interpreter threads (None: LiteRT's default).
      max_message_mb / timeout_seconds / retry_seconds: override edge.json's
        gRPC limits (None: the run's `config.grpc`, as exported).

    Returns:
      (EdgeClient, (x_test, y_test)).
    """
    spec = EdgeSpec.read(spec_path or os.path.join(os.path.dirname(model), "edge.json"))
    shard, test = load_client_data(spec, data, client_id)
    credentials = None
    if tls_dir:
        credentials = tls.channel_credentials(
            tls_dir, client_id if mutual_tls else None
        )
    token = read_tokens(token_file)[client_id] if token_file else None
    client = EdgeClient(
        model,
        spec,
        server,
        client_id,
        key,
        shard=shard,
        test=test,
        token=token,
        credentials=credentials,
        max_message_bytes=None if max_message_mb is None else max_message_mb << 20,
        timeout=timeout_seconds,
        retry_seconds=retry_seconds,
        num_threads=num_threads,
    )
    return client, test
