r"""Exports a client segment: SavedModel, LiteRT, and edge.json.

  splitkeras export --workdir=workdirs/fashion_mnist_lenet \
      --out=workdirs/export_lenet [--client_id=0] [--quantize=float16,int8] \
      [--notraining]
  splitkeras export --config=fashion_mnist_lenet \
      --untrained --out=workdirs/export_lenet_untrained

--workdir is a `splitkeras train` run (checkpoints/: the client with its
optimizer state, and the server) or a gRPC client's workdir
(client.weights.h5); the run's config.json (with every override it was trained
with) is its config, unless --config is given. --untrained exports the segment
of the config's seed instead, as a run starts: what an edge client that trains
from the run's first turn needs. Writes saved_model/ (serving_default = serve,
forward, backward, save, restore, init), client.tflite (the same, LiteRT
builtins only), serve_saved_model/ and client_serve_{float16,int8}.tflite
(inference), edge.json (for `splitkeras edge-client` and `splitkeras
predict`), export.json (sizes and output differences from Keras) and, when the
workdir holds the trained server, server_saved_model/; and prints them.
"""

import sys

from absl import flags

from splitkeras import cli
from splitkeras.export import export_from_workdir

_CONFIG = cli.define_config()
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
flags.mark_flags_as_required(["out"])
flags.register_multi_flags_validator(
    ["workdir", "untrained"],
    lambda v: bool(v["workdir"]) != v["untrained"],
    "pass exactly one of --workdir (a trained run) and --untrained",
)
flags.register_multi_flags_validator(
    ["config", "untrained"],
    lambda v: v["config"] is not None or not v["untrained"],
    "--untrained needs --config (there is no run to read it from)",
)


def main(argv):
    del argv
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


def run() -> None:
    sys.argv = cli.with_run_config(sys.argv)
    cli.run(main)


if __name__ == "__main__":
    run()
