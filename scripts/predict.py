"""Split inference: an exported client segment (LiteRT) + the server's segment.

Runs without TensorFlow (`pip install 'splitkeras[edge]'`). The server is
`scripts/serve.py --predict` with the trained server's --workdir.

  python scripts/predict.py --model=export/client_serve_int8.tflite \
      --server=127.0.0.1:50052 [--spec=export/edge.json] [--data=...] \
      [--batch_size=1] [--batches=200] [--summary=predict.json] \
      [--state=trained.npz] [--logits=logits.npy]

Sends the test split batch by batch (PREDICT messages), and reports the
accuracy of the returned logits and the latency per batch: on the device
(LiteRT serve), the round trip to the server, and end to end (medians and
90th percentiles, milliseconds). The first --warmup batches are sent but
not counted; --logits keeps the counted batches' logits.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras.edge import EdgeClient, EdgeSpec  # noqa: E402
from splitkeras.edge.client import eval_batches, load_client_data  # noqa: E402
from splitkeras.transport import tls  # noqa: E402
from splitkeras.transport.sealing import unpack_arrays  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Exported .tflite (serve).")
    parser.add_argument("--spec", help="edge.json (default: next to the model).")
    parser.add_argument("--server", required=True, help="The server's host:port.")
    parser.add_argument("--client_id", type=int, default=0)
    parser.add_argument("--data", help="IDX folder or .npz (default: edge.json's).")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=200, help="0: all.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tls_dir", help="Directory with ca.pem: use TLS.")
    parser.add_argument("--token_file", help="tokens.json holding this client's.")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads.")
    parser.add_argument("--summary", help="Write the summary (JSON) here.")
    parser.add_argument(
        "--state",
        help="Load this state (.npz from edge_client.py) first; needs the "
        "client.tflite with training signatures.",
    )
    parser.add_argument("--logits", help="Write the returned logits (.npy) here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    spec_path = args.spec or os.path.join(os.path.dirname(args.model), "edge.json")
    spec = EdgeSpec.read(spec_path)
    _, (x_test, y_test) = load_client_data(spec, args.data, args.client_id)
    credentials = tls.channel_credentials(args.tls_dir) if args.tls_dir else None
    token = (
        tls.read_tokens(args.token_file)[args.client_id] if args.token_file else None
    )
    predictor = EdgeClient(
        args.model,
        spec,
        args.server,
        args.client_id,
        token=token,
        credentials=credentials,
        num_threads=args.threads,
    )
    if args.state:
        with open(args.state, "rb") as f:
            predictor.segment.load_state(unpack_arrays(f.read()))
    batches = eval_batches(x_test, y_test, args.batch_size)
    correct = seen = 0
    kept = []
    for i, (x, y) in enumerate(batches):
        if args.batches and i >= args.batches + args.warmup:
            break
        (logits,) = predictor.predict(x)
        if i < args.warmup:
            predictor.timings.clear()  # the first calls set up the interpreter
            continue
        kept.append(logits)
        correct += int(np.sum(np.argmax(logits, axis=-1) == y))
        seen += len(y)
    predictor.close()
    if args.logits:
        np.save(args.logits, np.concatenate(kept))
    summary = {
        "model": os.path.basename(args.model),
        "batch_size": args.batch_size,
        "batches": len(predictor.timings),
        "accuracy": correct / max(seen, 1),
        **predictor.latency_ms(),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
