r"""Split inference: an exported client segment (LiteRT) + the server's segment.

Runs without TensorFlow (`pip install 'splitkeras[edge]'`). The server is
`splitkeras serve --predict` with the trained server's --workdir.

  splitkeras predict --model=export/client_serve_int8.tflite \
      --server=127.0.0.1:50052 [--spec=export/edge.json] [--data=...] \
      [--batch_size=1] [--batches=200] [--warmup=5] [--summary=predict.json] \
      [--state=trained.npz] [--logits=logits.npy]

Sends the first --batches batches of the test split (0: all of it) as
PREDICT messages and reports the accuracy of the returned logits over all of
them, and the latency per batch: on the device (LiteRT serve), the round
trip to the server, and end to end (medians and 90th percentiles,
milliseconds). The first --warmup batches are left out of the latency only;
--logits keeps the logits of every batch sent.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

from splitkeras.commands import edge_flags
from splitkeras.edge.inference import split_inference
from splitkeras.transport.sealing import unpack_arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    edge_flags.add_client_arguments(parser, client_id_required=False)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=200, help="0: all.")
    parser.add_argument("--warmup", type=int, default=5, help="Batches not timed.")
    parser.add_argument(
        "--state",
        help="Load this state (.npz from edge-client --save_state) first; needs the "
        "client.tflite with training signatures.",
    )
    parser.add_argument("--logits", help="Write the returned logits (.npy) here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    predictor, (x_test, y_test) = edge_flags.client_from_args(args)
    if args.state:
        with open(args.state, "rb") as f:
            predictor.segment.load_state(unpack_arrays(f.read()))
    summary, logits = split_inference(
        predictor, x_test, y_test, args.batch_size, args.batches, args.warmup
    )
    predictor.close()
    if args.logits:
        np.save(args.logits, logits)
    summary = {
        "model": os.path.basename(args.model),
        **summary,
        "tensorflow_imported": "tensorflow" in sys.modules,
    }
    edge_flags.write_summary(args, summary)
    print(json.dumps(summary, indent=2))


run = main

if __name__ == "__main__":
    run()
