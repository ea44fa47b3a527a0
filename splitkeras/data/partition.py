"""Splitting a dataset's examples among clients, IID or label-skewed."""

from __future__ import annotations

import numpy as np

PARTITION_METHODS = ("iid", "dirichlet")


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Assigns every example to exactly one client.

    Args:
      labels: Integer class labels, shape (examples,).
      num_clients: Number of clients, between 1 and the number of examples.
      method: 'iid' splits a seeded permutation into shards whose sizes
        differ by at most one. 'dirichlet' skews labels: for each class, the
        shares of the clients are drawn from Dirichlet(alpha); a client left
        empty then takes one example from the largest client.
      alpha: Dirichlet concentration, > 0; small values (0.1) give each client
        few classes, large values (100) approach IID. Used by 'dirichlet'.
      seed: Seed of the random assignment; equal seeds give equal results.

    Returns:
      One sorted int64 index array per client; the arrays are disjoint,
      non-empty and together hold every index of `labels`.

    Raises:
      ValueError: If `num_clients` is out of range, `method` is unknown, or
        `alpha` <= 0 for 'dirichlet'.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels have shape {labels.shape}; expected (examples,).")
    if not 1 <= num_clients <= len(labels):
        raise ValueError(
            f"num_clients={num_clients} must be between 1 and the number of "
            f"examples ({len(labels)})."
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        shards = np.array_split(rng.permutation(len(labels)), num_clients)
    elif method == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0 for method='dirichlet'.")
        shards = _dirichlet_shards(labels, num_clients, alpha, rng)
    else:
        raise ValueError(
            f"unknown partition method {method!r}; valid methods are: "
            f"{', '.join(PARTITION_METHODS)}."
        )
    return [np.sort(shard).astype(np.int64) for shard in shards]


def _dirichlet_shards(labels, num_clients, alpha, rng) -> list[np.ndarray]:
    pieces = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, piece in enumerate(np.split(members, cuts)):
            pieces[client].append(piece)
    shards = [np.concatenate(p) for p in pieces]
    # Repairing instead of resampling always terminates and stays seeded.
    for client in range(num_clients):
        if len(shards[client]) == 0:
            donor = int(np.argmax([len(s) for s in shards]))
            shards[client] = shards[donor][-1:]
            shards[donor] = shards[donor][:-1]
    return shards
