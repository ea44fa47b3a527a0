"""Trains one experiment: a config and a workdir.

  python scripts/train.py --config=configs/fashion_mnist_lenet.py \
      --workdir=workdirs/fmnist [--config.train.epochs=2 ...]

Run it again with the same --workdir to resume a stopped run.
"""

import logging as std_logging
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

# Config files import `configs.base`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import cli, experiment  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Our progress lines at INFO; TensorFlow's own INFO chatter stays hidden.
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("splitkeras").setLevel(std_logging.INFO)
    cli.check_config(_CONFIG.value)
    summary = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    test = (
        f"test accuracy: {summary['test_accuracy']:.4f} "
        f"(test loss {summary['test_loss']:.4f}"
        if "test_accuracy" in summary
        else f"test figures: {summary['test_figures']} ("
    )
    print(
        f"{test}, {summary['steps']} steps, {summary['wall_seconds']:.0f} s; "
        f"summary in {_WORKDIR.value}/summary.json)"
    )


if __name__ == "__main__":
    cli.run(main)
