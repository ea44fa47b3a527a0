"""Prints the seed's resource tables for a config: client FLOPs and bytes.

  python scripts/resource_table.py --config=configs/cifar10_vgg.py
  python scripts/resource_table.py --config=configs/cifar100_resnet50.py \
      --clients=100,500

Nothing is trained; the dataset is read only if `config.accounting` leaves
its size or shape to it.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

# Config files import `configs.base`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import data as data_lib  # noqa: E402
from splitkeras.accounting import tables  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_CLIENTS = flags.DEFINE_list("clients", None, "Client counts (default: config).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = _CONFIG.value
    acc = config.accounting
    arrays = None
    if not (acc.num_examples and acc.input_shape and acc.num_classes):
        arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    clients = [int(k) for k in (_CLIENTS.value or acc.clients.split(","))]
    print(tables.resource_tables(tables.assumptions(config, arrays), clients))


if __name__ == "__main__":
    app.run(main)
