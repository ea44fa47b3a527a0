"""What each party holds: its site's rows of a dataset, and its files.

A site is one party's data: its training rows, the test rows it evaluates
on, and (vertical) the sample ids of both. In one process, or for a quick
start, the sites come from partitioning a whole dataset exactly as the run
would (`partition_sites`); for a real deployment `splitkeras partition`
writes one file per site (`write_sites`), and each party is started with
only its own file (`load_site`): a client reads nothing else, a server
reads nothing at all.

Horizontal partitions (`iid`, `dirichlet`) give client k its shard of the
training set (the same shard `data.partition` assigns) and the whole test
split. The `vertical` partition gives client k the k-th strip of every
image (along the width) with the samples' ids; client 0, the label owner,
also holds the labels. numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from splitkeras.data.partition import partition

__all__ = ["Site", "load_site", "partition_sites", "site_path", "write_sites"]

MANIFEST = "sites.json"


@dataclasses.dataclass
class Site:
    """One party's rows. `y_*` None: the party holds no labels; `ids_*` None:
    rows need no alignment (horizontal)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    ids_train: np.ndarray | None = None
    ids_test: np.ndarray | None = None
    num_classes: int = 0
    data_name: str = ""

    @property
    def input_shape(self) -> tuple:
        return tuple(int(d) for d in self.x_train.shape[1:])


def partition_sites(
    arrays,
    num_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    label_owner: int = 0,
) -> list[Site]:
    """Every client's site of `arrays` (a `DatasetArrays`).

    Args:
      arrays: the whole dataset.
      num_clients: K.
      method: "iid" or "dirichlet" (shards, `data.partition`), or
        "vertical" (image strips with ids).
      alpha: the Dirichlet concentration.
      seed: the partition's seed.
      label_owner: vertical: the client that holds the labels.

    Raises:
      ValueError: an unknown method, or an image width that does not split
        into `num_clients` strips.
    """
    common = {"num_classes": int(arrays.num_classes), "data_name": arrays.name}
    if method == "vertical":
        return _vertical_sites(arrays, num_clients, label_owner, common)
    shards = partition(
        arrays.y_train, num_clients, method=method, alpha=alpha, seed=seed
    )
    return [
        Site(
            f"client_{k}",
            arrays.x_train[rows],
            arrays.y_train[rows],
            arrays.x_test,
            arrays.y_test,
            **common,
        )
        for k, rows in enumerate(shards)
    ]


def _vertical_sites(arrays, num_clients, label_owner, common) -> list[Site]:
    width = arrays.x_train.shape[2]
    if width % num_clients:
        raise ValueError(
            f"image width {width} does not split into {num_clients} equal strips"
        )
    step = width // num_clients
    ids_train = np.arange(len(arrays.x_train), dtype=np.int64)
    ids_test = np.arange(len(arrays.x_test), dtype=np.int64)
    sites = []
    for k in range(num_clients):
        strip = slice(k * step, (k + 1) * step)
        owner = k == label_owner
        sites.append(
            Site(
                f"client_{k}",
                arrays.x_train[:, :, strip],
                arrays.y_train if owner else None,
                arrays.x_test[:, :, strip],
                arrays.y_test if owner else None,
                ids_train,
                ids_test,
                **common,
            )
        )
    return sites


def site_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.npz")


def write_sites(sites, directory: str, description: dict | None = None) -> list[str]:
    """Writes one .npz file per site, and `sites.json` describing them.

    Returns:
      The files written, in site order.
    """
    os.makedirs(directory, exist_ok=True)
    paths = []
    for site in sites:
        arrays = {
            key: value
            for key, value in dataclasses.asdict(site).items()
            if isinstance(value, np.ndarray)
        }
        path = site_path(directory, site.name)
        np.savez(path, **arrays, num_classes=site.num_classes, data_name=site.data_name)
        paths.append(path)
    manifest = {
        **(description or {}),
        "sites": [
            {
                "name": s.name,
                "file": os.path.basename(p),
                "train_rows": int(len(s.x_train)),
                "test_rows": int(len(s.x_test)),
                "labels": s.y_train is not None,
                "ids": s.ids_train is not None,
            }
            for s, p in zip(sites, paths)
        ],
    }
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return paths


def load_site(directory: str, name: str) -> Site:
    """The site `name` (e.g. "client_1") from a folder `write_sites` wrote.

    Raises:
      FileNotFoundError: the folder holds no file for this site.
    """
    path = site_path(directory, name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: config.data.sites must be a folder written "
            "by `splitkeras partition` that holds this party's file"
        )
    with np.load(path, allow_pickle=False) as f:
        values = {key: f[key] for key in f.files}
    return Site(
        name,
        values["x_train"],
        values.get("y_train"),
        values["x_test"],
        values.get("y_test"),
        values.get("ids_train"),
        values.get("ids_test"),
        int(values["num_classes"]),
        str(values["data_name"]),
    )
