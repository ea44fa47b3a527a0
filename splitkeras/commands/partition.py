r"""Writes each site's own files from a dataset: one .npz per client.

  splitkeras partition --config=fashion_mnist_lenet \
      --config.num_clients=3 --out=sites/fmnist [--method=dirichlet]

The partition is the one the run itself would make from the whole dataset
(`config.data.partition`, `config.data.dirichlet_alpha`, `config.seed`;
vertical feature strips with sample ids for `config.topology='vertical'`),
so a run over the site files trains exactly as a run over the dataset.
Copy `client_k.npz` to site k and start its client with
`--config.data.sites=<folder holding it>`: the client reads that file and
nothing else; hosts read no data at all. `sites.json` describes the files.
"""

from absl import flags

from splitkeras import builders, cli
from splitkeras.data.sites import partition_sites, write_sites

_CONFIG = cli.define_config()
_OUT = flags.DEFINE_string("out", None, "Folder to write the site files into.")
_METHOD = flags.DEFINE_enum(
    "method",
    None,
    ["iid", "dirichlet", "vertical"],
    "Override the partition (default: vertical for a vertical topology, "
    "else config.data.partition).",
)
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    config = _CONFIG.value
    vertical = config.topology == "vertical"
    method = _METHOD.value or ("vertical" if vertical else config.data.partition)
    sites = partition_sites(
        builders.load_data(config),
        config.num_clients,
        method=method,
        alpha=config.data.dirichlet_alpha,
        seed=config.seed,
    )
    paths = write_sites(
        sites,
        _OUT.value,
        {"dataset": config.data.name, "method": method, "seed": config.seed},
    )
    for site, path in zip(sites, paths):
        labels = "labels" if site.y_train is not None else "no labels"
        print(f"{path}: {len(site.x_train)} training rows, {labels}")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
