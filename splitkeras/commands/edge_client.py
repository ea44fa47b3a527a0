r"""Trains an exported client segment with LiteRT against a splitkeras server.

Runs where TensorFlow is not installed: `pip install 'splitkeras[edge]'`
(numpy, grpcio, protobuf, cryptography, ai-edge-litert).

  splitkeras edge-client --model=export/client.tflite \
      --server=127.0.0.1:50051 --client_id=0 --key_file=handoff.key \
      [--spec=export/edge.json] [--data=/usr/share/datasets/fashion-mnist] \
      [--tls_dir=certs [--mutual_tls]] [--token_file=certs/tokens.json] \
      [--summary=edge_summary.json] [--save_state=trained.npz]

`export/` comes from `splitkeras export`; the server is `splitkeras serve`
with the same config. The summary lists the loss of every step, the bytes
sent and received, and confirms that TensorFlow was never imported.
"""

import argparse
import logging
import sys

from splitkeras.commands import edge_flags
from splitkeras.transport.sealing import pack_arrays, read_key


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    edge_flags.add_client_arguments(parser, client_id_required=True)
    parser.add_argument("--key_file", required=True, help="Clients' handoff key.")
    parser.add_argument(
        "--save_state", help="Write the trained segment's state (.npz) here."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    client, _ = edge_flags.client_from_args(args, read_key(args.key_file))
    summary = client.run()
    client.close()
    if args.save_state:
        with open(args.save_state, "wb") as f:
            f.write(pack_arrays(client.segment.state()))
    summary["tensorflow_imported"] = "tensorflow" in sys.modules
    edge_flags.write_summary(args, summary)
    losses = summary["losses"]
    print(
        f"edge client {args.client_id} done: {summary['steps']} steps, loss "
        f"{losses[0] if losses else float('nan'):.4f} -> "
        f"{losses[-1] if losses else float('nan'):.4f}, TensorFlow imported: "
        f"{summary['tensorflow_imported']}"
    )


run = main

if __name__ == "__main__":
    run()
