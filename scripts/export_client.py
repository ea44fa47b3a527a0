"""Exports a client segment: SavedModel, LiteRT, and edge.json.

  python scripts/export_client.py --config=configs/fashion_mnist_lenet.py \
      --workdir=workdirs/fashion_mnist_lenet --out=workdirs/export_lenet \
      [--client_id=0] [--quantize=float16,int8] [--notraining]
  python scripts/export_client.py --config=configs/fashion_mnist_lenet.py \
      --untrained --out=workdirs/export_lenet_untrained

--workdir is a scripts/train.py run (checkpoints/: the client with its
optimizer state, and the server) or a gRPC client's workdir
(client.weights.h5). --untrained exports the segment of the config's seed
instead, as a run starts: what an edge client that trains from the run's
first turn needs. Writes saved_model/ (serve, forward, backward, save,
restore, init), client.tflite (the same, LiteRT builtins only),
serve_saved_model/ and client_serve_{float16,int8}.tflite (inference),
edge.json (for scripts/edge_client.py and scripts/predict.py), export.json
(sizes and output differences from Keras) and, when the workdir holds the
trained server, server_saved_model/; and prints them.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras.export import export_from_workdir  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's directory.")
_UNTRAINED = flags.DEFINE_bool(
    "untrained", False, "Export the config seed's untrained segment (no --workdir)."
)
_OUT = flags.DEFINE_string("out", None, "Where to write the exported models.")
_CLIENT_ID = flags.DEFINE_integer("client_id", 0, "The client to export.")
_QUANTIZE = flags.DEFINE_list(
    "quantize", ["float16", "int8"], "Quantized inference variants to write."
)
_TRAINING = flags.DEFINE_bool(
    "training",
    None,
    "Export the on-device training signatures too (default: yes for a "
    "vanilla client, no for a U-shaped one).",
)
flags.mark_flags_as_required(["config", "out"])
flags.register_multi_flags_validator(
    ["workdir", "untrained"],
    lambda v: bool(v["workdir"]) != v["untrained"],
    "pass exactly one of --workdir (a trained run) and --untrained",
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    report = export_from_workdir(
        _CONFIG.value,
        None if _UNTRAINED.value else _WORKDIR.value,
        _OUT.value,
        client_id=_CLIENT_ID.value,
        training=_TRAINING.value,
        quantize=tuple(q for q in _QUANTIZE.value if q),
    )
    print(f"restored from {report['restored_from'] or 'nothing (untrained)'}")
    print(f"{'artifact':32} {'bytes':>10} {'max |diff| vs Keras':>20}")
    for name, artifact in report["artifacts"].items():
        print(f"{name:32} {artifact['bytes']:>10,} {artifact['max_abs_diff']:>20.2e}")
    if not report["server"]["exported"]:
        print(f"server segment not exported: {report['server']['reason']}")
    print(f"written to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
