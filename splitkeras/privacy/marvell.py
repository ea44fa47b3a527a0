"""Marvell-style label protection: noise shaped to the classes' gradients.

Li et al., "Label Leakage and Protection in Two-party Split Learning"
(ICLR 2022), protect binary labels by adding to each example's gradient
noise whose covariance depends on the example's class, chosen to minimize
how well the two perturbed gradient distributions can be told apart
(a symmetrized KL divergence) under a power budget
P = s * |mean gradient of class 1 - mean gradient of class 0|^2.

Here, for each class k present in a batch (one against the rest):

- Delta_k = mean gradient of class k - mean gradient of the other examples,
  p_k = the fraction of the batch in class k, u_k and v_k = the variance
  per dimension of the two groups' gradients (an isotropic Gaussian model
  of each group, as Marvell's);
- along the unit direction e_k = Delta_k / |Delta_k|, class-k examples get
  Gaussian noise of variance a1 and the others of variance a0, where
  (a1, a0) minimizes the symmetrized KL divergence between the two groups
  projected on e_k, KL(N(|Delta_k|, u_k + a1) || N(0, v_k + a0)) + the
  reverse, subject to p_k a1 + (1 - p_k) a0 = s |Delta_k|^2. The minimum
  is searched on a fixed grid of `GRID` splits of the budget (a share t of
  it to class k: a1 = t P / p_k, a0 = (1 - t) P / (1 - p_k)), so the
  budget holds exactly;
- the noise of every class is drawn independently and summed.

How this differs from Marvell: the paper solves for four variables, the
noise along Delta and the isotropic noise orthogonal to it for each class,
and handles two classes only. This keeps the noise along Delta only (the
objective here is the divergence of the two groups projected on Delta,
which noise orthogonal to Delta does not change), and generalizes to many
classes one against the rest, so an example receives noise along every
present class's direction. With two classes both one-against-the-rest
problems lie on the same line (Delta_0 = -Delta_1) and choose mirrored
variances, so an example gets twice the variance along Delta that one
problem chose: the mean power added is 2 s |Delta|^2, not Marvell's
s |Delta|^2 (in general, s times the sum of |Delta_k|^2). A class
absent from the batch, or holding every example of it (no rest), gets no
noise; so does a class whose Delta is 0.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = [
    "GRID",
    "marvell_noise",
    "marvell_variances",
    "num_classes_of",
    "symmetric_kl",
]

# Splits of the power budget between the two groups that are searched.
GRID = 101


def num_classes_of(model):
    """The classes a model's (first) output scores: its last dimension (2
    for a single sigmoid unit), or None when that is not known statically."""
    outputs = getattr(model, "outputs", None)
    width = outputs[0].shape[-1] if outputs else None
    return None if width is None else max(int(width), 2)


def symmetric_kl(distance_sq, var1, var0):
    """KL(N(d, var1) || N(0, var0)) + KL(N(0, var0) || N(d, var1)), 1-D.

    Args:
      distance_sq: d^2, the squared distance of the two means.
      var1, var0: the two variances (> 0; broadcastable).
    """
    return 0.5 * (var1 / var0 + var0 / var1 - 2.0) + 0.5 * distance_sq * (
        1.0 / var0 + 1.0 / var1
    )


def _membership(labels, num_classes=None):
    """(classes [m], members [n, m] float64): which example is in which class.

    With `num_classes` the classes are 0..num_classes-1 (absent ones have
    no members; no tf.unique, so XLA can compile it); without, the classes
    present, in order of first appearance.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape.rank >= 2:
        if labels.shape[-1] is not None and labels.shape[-1] > 1:
            labels = tf.argmax(labels, axis=-1)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    if num_classes:
        classes = tf.range(num_classes, dtype=tf.int64)
        return classes, tf.one_hot(labels, num_classes, dtype=tf.float64)
    classes, index = tf.unique(labels)
    return classes, tf.one_hot(index, tf.size(classes), dtype=tf.float64)


def marvell_variances(gradients, labels, strength: float, num_classes=None):
    """The chosen noise of each present class (see the module docstring).

    Args:
      gradients: per-example gradients, [n, d] (float).
      labels: the n examples' classes ([n] or [n, 1] indices, or one-hot).
      strength: s, the power budget as a multiple of |Delta_k|^2 (> 0).
      num_classes: the number of classes, if known (then m = num_classes
        and the op compiles under XLA); None: the classes present.

    Returns:
      (classes [m], a1 [m], a0 [m], directions [m, d]) in float64: the m
      classes (present ones in order of first appearance, or 0..m-1), the
      noise variances of class-k examples and of the others along e_k,
      and the e_k (rows of zeros, with a1 = a0 = 0, where there is no
      noise).
    """
    g = tf.cast(gradients, tf.float64)
    classes, members = _membership(labels, num_classes)  # [m], [n, m]
    n = tf.cast(tf.shape(g)[0], tf.float64)
    d = tf.cast(tf.shape(g)[1], tf.float64)
    count = tf.reduce_sum(members, 0)
    rest = n - count
    has_rest = rest > 0.0
    count_safe = tf.where(count > 0.0, count, 1.0)
    rest_safe = tf.where(has_rest, rest, 1.0)
    sums = tf.matmul(members, g, transpose_a=True)  # [m, d]
    mean1 = sums / count_safe[:, None]
    mean0 = (tf.reduce_sum(g, 0)[None, :] - sums) / rest_safe[:, None]
    delta = mean1 - mean0
    delta_sq = tf.reduce_sum(tf.square(delta), 1)
    squares = tf.reduce_sum(tf.square(g), 1)  # [n]
    sq1 = tf.linalg.matvec(members, squares, transpose_a=True)
    sq0 = tf.reduce_sum(squares) - sq1
    # Per-dimension variances: E|g - mean|^2 / d (>= 0 despite rounding).
    u = tf.maximum(sq1 / count_safe - tf.reduce_sum(tf.square(mean1), 1), 0.0) / d
    v = tf.maximum(sq0 / rest_safe - tf.reduce_sum(tf.square(mean0), 1), 0.0) / d
    noised = (count > 0.0) & has_rest & (delta_sq > 0.0)
    budget = float(strength) * delta_sq
    share = tf.linspace(tf.constant(0.0, tf.float64), 1.0, GRID)[None, :]
    # a1 = t P / p, a0 = (1 - t) P / (1 - p), with p = count / n.
    a1_grid = share * (budget * n / count_safe)[:, None]
    a0_grid = (1.0 - share) * (budget * n / rest_safe)[:, None]
    kl = symmetric_kl(delta_sq[:, None], u[:, None] + a1_grid, v[:, None] + a0_grid)
    # A zero variance (no spread, no noise) separates the groups perfectly.
    kl = tf.where(tf.math.is_finite(kl), kl, tf.constant(float("inf"), tf.float64))
    best = tf.argmin(kl, axis=1, output_type=tf.int32)
    a1 = tf.gather(a1_grid, best, batch_dims=1)
    a0 = tf.gather(a0_grid, best, batch_dims=1)
    zero = tf.zeros_like(a1)
    a1, a0 = tf.where(noised, a1, zero), tf.where(noised, a0, zero)
    norm = tf.sqrt(tf.where(noised, delta_sq, 1.0))
    directions = tf.where(noised[:, None], delta / norm[:, None], 0.0)
    return classes, a1, a0, directions


def marvell_noise(
    gradients, labels, strength: float, seed, num_classes=None
) -> tf.Tensor:
    """Per-example gradients with Marvell-style noise added.

    TensorFlow ops only (safe inside a `tf.function`, any batch size).

    Args:
      gradients: per-example gradients [n, ...] (float); the noise is
        computed on them flattened to [n, d] and added in their dtype.
      labels: the n examples' classes ([n] or [n, 1] indices, or one-hot).
      strength: s >= 0, the power budget as a multiple of each class's
        |Delta_k|^2; 0 returns `gradients` unchanged.
      seed: a `keras.random.SeedGenerator` (or seed) for the noise.
      num_classes: the number of classes if known (XLA-compilable);
        None: the classes present in the batch (tf.unique).

    Returns:
      gradients + the sum over present classes k of z e_k, z ~ N(0, a1_k)
      for class-k examples and N(0, a0_k) for the others, drawn
      independently per example and class.

    Raises:
      ValueError: `strength` is negative.
    """
    if strength < 0:
        raise ValueError(f"marvell strength must be >= 0, got {strength}")
    if not strength:
        return gradients
    gradients = tf.convert_to_tensor(gradients)
    flat = tf.reshape(gradients, [tf.shape(gradients)[0], -1])
    flat = tf.stop_gradient(flat)
    _, a1, a0, directions = marvell_variances(flat, labels, strength, num_classes)
    _, members = _membership(labels, num_classes)
    scale = tf.sqrt(tf.where(members > 0.0, a1[None, :], a0[None, :]))  # [n, m]
    z = keras.random.normal(tf.shape(scale), dtype="float64", seed=seed)
    noise = tf.matmul(z * scale, directions)
    noise = tf.reshape(tf.cast(noise, gradients.dtype), tf.shape(gradients))
    return gradients + noise
