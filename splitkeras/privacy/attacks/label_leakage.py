"""Label leakage from gradients in two-party split learning (binary labels).

Li et al., "Label Leakage and Protection in Two-party Split Learning"
(ICLR 2022): the party without labels receives, for each example, the
gradient of the loss with respect to its cut activations. With imbalanced
binary labels those gradients give the labels away:

- norm attack: minority-class (positive) examples have larger gradient norms,
  especially early in training;
- cosine attack: the gradients of the two classes point in opposite
  directions, so the cosine similarity with one positive example's gradient
  separates the classes.

Each attack is a score per example; its leak AUC (the ROC AUC of the scores
against the true labels) measures the leakage.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_scores", "label_leakage", "leak_auc", "norm_scores"]


def _per_example(gradients) -> np.ndarray:
    """Gradients as a float64 [n, features] array."""
    g = np.asarray(gradients, dtype=np.float64)
    if g.ndim == 0 or not len(g):
        raise ValueError(f"need per-example gradients [n, ...], got shape {g.shape}.")
    return g.reshape(len(g), -1)


def norm_scores(gradients) -> np.ndarray:
    """The L2 norm of each example's gradient (flattened), shape ``[n]``.

    Args:
      gradients: per-example gradients ``[n, ...]`` (tensor or array).

    Returns:
      A float64 array of ``n`` norms: the norm attack's scores (larger means
      more likely positive, i.e. the minority class).
    """
    return np.linalg.norm(_per_example(gradients), axis=1)


def cosine_scores(gradients, reference=None) -> np.ndarray:
    """Cosine similarity of each example's gradient with a reference gradient.

    Args:
      gradients: per-example gradients ``[n, ...]`` (tensor or array).
      reference: one gradient of the per-example shape. By default, the
        gradient with the largest norm, which Li et al. use as a stand-in for
        a known positive example.

    Returns:
      A float64 array of ``n`` similarities in [-1, 1]: the cosine attack's
      scores. An all-zero gradient scores 0.
    """
    g = _per_example(gradients)
    norms = np.linalg.norm(g, axis=1)
    if reference is None:
        ref = g[np.argmax(norms)]
    else:
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        if ref.size != g.shape[1]:
            raise ValueError(
                f"reference has {ref.size} values but each gradient has "
                f"{g.shape[1]}: pass one example's gradient."
            )
    denominator = norms * np.linalg.norm(ref)
    safe = np.where(denominator > 0.0, denominator, 1.0)
    return np.where(denominator > 0.0, (g @ ref) / safe, 0.0)


def leak_auc(scores, labels) -> float:
    """The ROC AUC of ``scores`` as a predictor of binary ``labels``.

    The Mann-Whitney statistic with average ranks for ties: the probability
    that a random positive outscores a random negative, ties counting half.
    This is the plain AUC, not ``max(auc, 1 - auc)``: 0.5 means no leakage,
    and an AUC near 0 leaks as much as one near 1 (the attacker flips the
    sign of the scores).

    Args:
      scores: ``[n]`` real scores, finite.
      labels: ``[n]`` binary labels (0/1 or bool); both classes must occur.

    Returns:
      The AUC in [0, 1].

    Raises:
      ValueError: shapes differ, labels are not binary or miss a class, or a
        score is not finite.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite; got NaN or infinity.")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)}.")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ValueError(
            f"the AUC needs both classes; got {n_pos} positives, {n_neg} negatives."
        )
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Twice the average (1-based) rank of each tie group, an integer, so the
    # statistic is exact.
    twice_rank = 2 * np.cumsum(counts) - counts + 1
    twice_u = int(twice_rank[group.reshape(-1)][positive].sum()) - n_pos * (n_pos + 1)
    return twice_u / (2 * n_pos * n_neg)


def label_leakage(gradients, labels) -> dict:
    """The leak AUCs of the norm and cosine attacks.

    Args:
      gradients: per-example gradients ``[n, ...]`` received by the party
        without labels.
      labels: the true binary labels ``[n]``, for scoring the attacks.

    Returns:
      ``{"norm_auc": float, "cosine_auc": float}`` (see `leak_auc`).
    """
    return {
        "norm_auc": leak_auc(norm_scores(gradients), labels),
        "cosine_auc": leak_auc(cosine_scores(gradients), labels),
    }
