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

from splitkeras.edge import cli  # noqa: E402
from splitkeras.edge.client import eval_batches  # noqa: E402
from splitkeras.transport.sealing import unpack_arrays  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_client_arguments(parser, client_id_required=False)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=200, help="0: all.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--state",
        help="Load this state (.npz from edge_client.py) first; needs the "
        "client.tflite with training signatures.",
    )
    parser.add_argument("--logits", help="Write the returned logits (.npy) here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    predictor, (x_test, y_test) = cli.make_client(args)
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
    cli.write_summary(args, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
