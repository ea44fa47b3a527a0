"""What scripts/edge_client.py and scripts/predict.py share: the flags that
name the model, the run, the server and the credentials, and the client
they make. argparse only (no absl on a device)."""

from __future__ import annotations

import json
import os

from splitkeras.edge.client import EdgeClient, load_client_data
from splitkeras.edge.spec import EdgeSpec
from splitkeras.transport import tls

__all__ = ["add_client_arguments", "make_client", "write_summary"]


def add_client_arguments(parser, client_id_required: bool) -> None:
    """--model, --spec, --server, --client_id, --data, TLS, token, threads,
    --summary."""
    parser.add_argument("--model", required=True, help="Exported .tflite.")
    parser.add_argument("--spec", help="edge.json (default: next to the model).")
    parser.add_argument("--server", required=True, help="The server's host:port.")
    parser.add_argument("--client_id", type=int, required=client_id_required, default=0)
    parser.add_argument("--data", help="IDX folder or .npz (default: edge.json's).")
    parser.add_argument("--tls_dir", help="Directory with ca.pem: use TLS.")
    parser.add_argument("--mutual_tls", action="store_true")
    parser.add_argument("--token_file", help="tokens.json holding this client's.")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads.")
    parser.add_argument("--summary", help="Write the summary (JSON) here.")


def make_client(args, key: bytes | None = None):
    """(EdgeClient, (x_test, y_test)) from the parsed arguments; with a `key`
    the client takes turns training its shard."""
    spec_path = args.spec or os.path.join(os.path.dirname(args.model), "edge.json")
    spec = EdgeSpec.read(spec_path)
    k = args.client_id
    shard, test = load_client_data(spec, args.data, k)
    credentials = None
    if args.tls_dir:
        mutual = k if args.mutual_tls else None
        credentials = tls.channel_credentials(args.tls_dir, mutual)
    token = tls.read_tokens(args.token_file)[k] if args.token_file else None
    client = EdgeClient(
        args.model,
        spec,
        args.server,
        k,
        key,
        shard=shard,
        test=test,
        token=token,
        credentials=credentials,
        num_threads=args.threads,
    )
    return client, test


def write_summary(args, summary: dict) -> None:
    """Writes `summary` to --summary (if given)."""
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
