"""The command-line flags `splitkeras edge-client` and `splitkeras predict` share:
the model, the run, the server, the credentials and the gRPC limits.
argparse only (no absl on a device)."""

import json

from splitkeras.edge.connect import connect


def add_client_arguments(parser, client_id_required: bool) -> None:
    """--model, --spec, --server, --client_id, --data, TLS, token, threads,
    gRPC overrides, --summary."""
    parser.add_argument("--model", required=True, help="Exported .tflite.")
    parser.add_argument("--spec", help="edge.json (default: next to the model).")
    parser.add_argument("--server", required=True, help="The server's host:port.")
    parser.add_argument("--client_id", type=int, required=client_id_required, default=0)
    parser.add_argument(
        "--data", help="IDX folder or .npz file (default: edge.json's data path)."
    )
    parser.add_argument("--tls_dir", help="Directory with ca.pem: use TLS.")
    parser.add_argument("--mutual_tls", action="store_true")
    parser.add_argument("--token_file", help="tokens.json holding this client's.")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads.")
    for name, kind in (
        ("max_message_mb", int),
        ("timeout_seconds", float),
        ("retry_seconds", float),
    ):
        parser.add_argument(
            f"--{name}", type=kind, help=f"Overrides edge.json's {name} (config.grpc)."
        )
    parser.add_argument("--summary", help="Write the summary (JSON) here.")


def client_from_args(args, key: bytes | None = None):
    """(EdgeClient, (x_test, y_test)) from the parsed arguments; with a `key`
    the client takes turns training its shard."""
    return connect(
        args.model,
        args.server,
        args.client_id,
        key=key,
        spec_path=args.spec,
        data=args.data,
        tls_dir=args.tls_dir,
        mutual_tls=args.mutual_tls,
        token_file=args.token_file,
        num_threads=args.threads,
        max_message_mb=args.max_message_mb,
        timeout_seconds=args.timeout_seconds,
        retry_seconds=args.retry_seconds,
    )


def write_summary(args, summary: dict) -> None:
    """Writes `summary` to --summary (if given)."""
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
