"""Pareto frontiers of study rows, and a run's figures after each epoch.

`nondominated` serves the cut advisor (dCor against bytes or FLOPs) and the
privacy report (test accuracy against dCor, over defenses, epochs and cuts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

__all__ = ["epoch_figures", "nondominated"]


def _worse(a: float, b: float) -> bool:
    """a > b, NaN counting as the worst value."""
    if math.isnan(a):
        return not math.isnan(b)
    return not math.isnan(b) and a > b


def nondominated(items: Sequence, costs: Callable[[object], Sequence[float]]) -> list:
    """The items that no other item dominates, in their order.

    `costs(item)` gives the values to minimize (negate one to maximize it).
    An item is dominated by another that is no worse on every value and
    better on one; items with equal values do not dominate each other. NaN
    is the worst value.
    """
    values = [[float(v) for v in costs(item)] for item in items]
    front = []
    for i, a in enumerate(values):
        dominated = any(
            j != i
            and all(not _worse(y, x) for x, y in zip(a, b))
            and any(_worse(x, y) for x, y in zip(a, b))
            for j, b in enumerate(values)
        )
        if not dominated:
            front.append(items[i])
    return front


def epoch_figures(run_dir: str, tags: Sequence[str], split="validation") -> dict:
    """{epoch: {tag: value}} of a run's TensorBoard scalars under `split`.

    The runner writes each epoch's validation figures at step epoch (from 1);
    an epoch written twice (a resumed run) keeps its last value. Epochs that
    lack one of `tags` are left out.
    """
    import tensorflow as tf

    found = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(run_dir, split, "events*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in tags:
                    figure = float(tf.make_ndarray(value.tensor))
                    found.setdefault(event.step, {})[value.tag] = figure
    return {
        epoch: figures
        for epoch, figures in sorted(found.items())
        if all(tag in figures for tag in tags)
    }
