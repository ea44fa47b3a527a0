r"""Prints the seed's resource tables for a config: client FLOPs and bytes.

  splitkeras resource-table --config=cifar10_vgg
  splitkeras resource-table --config=cifar100_resnet50 \
      --clients=100,500

Nothing is trained; the dataset is read only if `config.accounting` leaves
its size or shape to it.
"""

from absl import flags

from splitkeras import cli
from splitkeras import data as data_lib
from splitkeras.accounting import tables

_CONFIG = cli.define_config()
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


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
