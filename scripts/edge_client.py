"""Trains an exported client segment with LiteRT against a splitkeras server.

Runs where TensorFlow is not installed: `pip install 'splitkeras[edge]'`
(numpy, grpcio, protobuf, cryptography, ai-edge-litert).

  python scripts/edge_client.py --model=export/client.tflite \
      --server=127.0.0.1:50051 --client_id=0 --key_file=handoff.key \
      [--spec=export/edge.json] [--data=/usr/share/datasets/fashion-mnist] \
      [--tls_dir=certs [--mutual_tls]] [--token_file=certs/tokens.json] \
      [--summary=edge_summary.json] [--save_state=trained.npz]

`export/` comes from scripts/export_client.py; the server is scripts/serve.py
with the same config. The summary lists the loss of every step, the bytes
sent and received, and confirms that TensorFlow was never imported.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras.edge import EdgeClient, EdgeSpec  # noqa: E402
from splitkeras.edge.client import load_client_data  # noqa: E402
from splitkeras.transport import tls  # noqa: E402
from splitkeras.transport.sealing import pack_arrays, read_key  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Exported client.tflite.")
    parser.add_argument("--spec", help="edge.json (default: next to the model).")
    parser.add_argument("--server", required=True, help="The server's host:port.")
    parser.add_argument("--client_id", type=int, required=True)
    parser.add_argument("--key_file", required=True, help="Clients' handoff key.")
    parser.add_argument("--data", help="IDX folder or .npz (default: edge.json's).")
    parser.add_argument("--tls_dir", help="Directory with ca.pem: use TLS.")
    parser.add_argument("--mutual_tls", action="store_true")
    parser.add_argument("--token_file", help="tokens.json holding this client's.")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads.")
    parser.add_argument("--summary", help="Write the summary (JSON) here.")
    parser.add_argument(
        "--save_state", help="Write the trained segment's state (.npz) here."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    spec_path = args.spec or os.path.join(os.path.dirname(args.model), "edge.json")
    spec = EdgeSpec.read(spec_path)
    k = args.client_id
    shard, test = load_client_data(spec, args.data, k)
    credentials = None
    if args.tls_dir:
        credentials = tls.channel_credentials(
            args.tls_dir, k if args.mutual_tls else None
        )
    token = tls.read_tokens(args.token_file)[k] if args.token_file else None
    client = EdgeClient(
        args.model,
        spec,
        args.server,
        k,
        read_key(args.key_file),
        shard=shard,
        test=test,
        token=token,
        credentials=credentials,
        num_threads=args.threads,
    )
    summary = client.run()
    client.close()
    if args.save_state:
        with open(args.save_state, "wb") as f:
            f.write(pack_arrays(client.segment.state()))
    summary["tensorflow_imported"] = "tensorflow" in sys.modules
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    losses = summary["losses"]
    print(
        f"edge client {k} done: {summary['steps']} steps, loss "
        f"{losses[0] if losses else float('nan'):.4f} -> "
        f"{losses[-1] if losses else float('nan'):.4f}, TensorFlow imported: "
        f"{summary['tensorflow_imported']}"
    )


if __name__ == "__main__":
    main()
