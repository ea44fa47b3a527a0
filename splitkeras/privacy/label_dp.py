"""Label differential privacy by randomized response (Ghazi et al., 2021).

The party that holds the labels replaces each training label once, before
training, by randomized response RR_epsilon: the true label with probability
e^epsilon / (e^epsilon + K - 1), otherwise one of the other K - 1 classes,
uniformly. Whatever is computed from the randomized labels (the weights, the
output gradients a U-shaped server receives, the labels a vanilla server
receives) is then epsilon-label-differentially private.

The draw is secret and fixed: `training_labels` seeds it from the operating
system's entropy, never from the config (whose seed the server knows: with
it, the kept labels and the shifts could be recomputed and the randomization
undone), and keeps that seed for the process, so every epoch trains on the
same noisy labels (drawing again each epoch would spend epsilon again). A
process started again (a resumed run, a restarted client) draws anew: two
draws of the same labels are 2 x epsilon-label-DP by composition.
"""

from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["keep_probability", "randomized_response", "secret_seed", "training_labels"]


def keep_probability(epsilon: float, num_classes: int) -> float:
    """The probability that RR_epsilon keeps a label: e^eps / (e^eps + K - 1)."""
    if epsilon <= 0:
        raise ValueError(f"label DP needs epsilon > 0, got {epsilon}")
    if num_classes < 2:
        raise ValueError(f"label DP needs at least 2 classes, got {num_classes}")
    # 1 / (1 + (K - 1) e^-eps): no overflow for a large epsilon.
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(labels, epsilon: float, num_classes: int, seed) -> np.ndarray:
    """The labels after RR_epsilon: each kept with `keep_probability`, else
    replaced by one of the other classes, uniformly.

    Args:
      labels: integer class labels in [0, num_classes), any shape.
      epsilon: the privacy parameter (> 0).
      num_classes: K.
      seed: anything `numpy.random.default_rng` takes.

    Returns:
      An array of the labels' shape and dtype.
    """
    labels = np.asarray(labels)
    keep = keep_probability(epsilon, num_classes)
    rng = np.random.default_rng(seed)
    kept = rng.random(labels.shape) < keep
    # Another class, uniformly: add 1..K-1 modulo K.
    shift = rng.integers(1, num_classes, labels.shape)
    other = (labels.astype(np.int64) + shift) % num_classes
    return np.where(kept, labels, other).astype(labels.dtype)


# This process's secret seed of each party's draw: OS entropy, made once.
_SECRETS: dict = {}
_SECRETS_LOCK = threading.Lock()


def secret_seed(party) -> int:
    """The secret seed of `party`'s draw in this process (OS entropy)."""
    with _SECRETS_LOCK:
        if party not in _SECRETS:
            _SECRETS[party] = np.random.SeedSequence().entropy
        return _SECRETS[party]


def training_labels(config, labels, num_classes: int, party=0):
    """A label holder's training labels under `config.privacy.label_epsilon`
    (0: off, the labels themselves), randomized from `secret_seed(party)`."""
    epsilon = float(config.privacy.get("label_epsilon", 0.0))
    if not epsilon or labels is None:
        return labels
    return randomized_response(labels, epsilon, num_classes, secret_seed(party))
