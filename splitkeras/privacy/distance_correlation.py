"""Sample distance correlation (Székely, Rizzo and Bakirov, 2007) in TensorFlow.

NoPeekNN (Vepakomma et al., 2019) adds ``alpha * distance_correlation(x, z)``
between a client's raw inputs ``x`` and its cut activations ``z`` to the
client loss, so the functions here are differentiable TensorFlow ops that run
inside a traced step. Both use the biased (V-statistic) estimator, the one
``dcor.distance_correlation`` computes.

Pairwise distances come from the Gram matrix of the mean-centred batch, so the
memory cost is ``O(n**2 + n * features)`` rather than ``O(n**2 * features)``.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["distance_correlation", "distance_covariance_squared"]

# A squared distance within this many float epsilons of the squared norms is
# rounding noise of the Gram formula: it counts as an exact zero, so identical
# samples get a zero gradient rather than a huge one.
_ZERO_DISTANCE_ULPS = 8.0
_EPSILON = {tf.float32: 2.0**-23, tf.float64: 2.0**-52}


def _safe_sqrt(x: tf.Tensor, positive: tf.Tensor) -> tf.Tensor:
    """sqrt(x) where ``positive``, else 0, with a zero (not NaN) gradient there."""
    root = tf.sqrt(tf.where(positive, x, tf.ones_like(x)))
    return tf.where(positive, root, tf.zeros_like(x))


def _as_batches(x, z) -> tuple[tf.Tensor, tf.Tensor]:
    """Both batches as [n, features], in float64 if either is, else float32."""
    x, z = tf.convert_to_tensor(x), tf.convert_to_tensor(z)
    if x.shape.rank == 0 or z.shape.rank == 0:
        raise ValueError(
            f"distance correlation needs batches [n, ...], got shapes {x.shape} "
            f"and {z.shape}: add a sample axis."
        )
    n_x, n_z = x.shape[0], z.shape[0]
    if n_x is not None and n_z is not None and n_x != n_z:
        raise ValueError(
            "x and z must hold the same number of samples (first axis), got "
            f"shapes {x.shape} and {z.shape}."
        )
    # The Gram formula cancels digits, so 16-bit floats are widened too.
    dtype = tf.float64 if tf.float64 in (x.dtype, z.dtype) else tf.float32
    x, z = (tf.reshape(tf.cast(t, dtype), [tf.shape(t)[0], -1]) for t in (x, z))
    with tf.control_dependencies(
        [tf.debugging.assert_equal(tf.shape(x)[0], tf.shape(z)[0])]
    ):
        return tf.identity(x), tf.identity(z)


def _centred_distances(x: tf.Tensor) -> tf.Tensor:
    """The double-centred Euclidean distance matrix of a [n, features] batch."""
    raw_norms = tf.reduce_sum(tf.square(x), axis=1)
    # Distances are translation invariant; centring first keeps the Gram
    # formula from cancelling large equal terms.
    c = x - tf.reduce_mean(x, axis=0, keepdims=True)
    norms = tf.reduce_sum(tf.square(c), axis=1)
    d2 = norms[:, None] + norms[None, :] - 2.0 * tf.matmul(c, c, transpose_b=True)
    eps = tf.constant(_ZERO_DISTANCE_ULPS * _EPSILON[x.dtype], x.dtype)
    tolerance = eps * (raw_norms[:, None] + raw_norms[None, :])
    off_diagonal = tf.logical_not(tf.eye(tf.shape(x)[0], dtype=tf.bool))
    d = _safe_sqrt(d2, tf.logical_and(d2 > tolerance, off_diagonal))
    return (
        d
        - tf.reduce_mean(d, axis=0, keepdims=True)
        - tf.reduce_mean(d, axis=1, keepdims=True)
        + tf.reduce_mean(d)
    )


def distance_covariance_squared(x, z) -> tf.Tensor:
    """The biased sample distance covariance squared, dCov²_n(x, z).

    Args:
      x: a batch of shape ``[n, ...]``; the first axis indexes samples and all
        other axes are flattened into one feature vector per sample.
      z: a batch with the same number of samples ``n``, any other shape.

    Returns:
      The scalar ``mean(A * B)`` of the double-centred distance matrices ``A``
      and ``B`` (non-negative up to rounding); float64 if ``x`` or ``z`` is,
      else float32 (integer and 16-bit inputs are computed in float32).

    Raises:
      ValueError: a batch is a scalar, or the static batch sizes differ.
    """
    x, z = _as_batches(x, z)
    return tf.reduce_mean(_centred_distances(x) * _centred_distances(z))


def distance_correlation(x, z) -> tf.Tensor:
    """The biased sample distance correlation dCor_n(x, z) of two batches.

    This returns dCor, NOT dCor²: ``sqrt(dCov²(x, z) / sqrt(dVar²(x) dVar²(z)))``
    (Székely et al., 2007, V-statistic), as ``dcor.distance_correlation``
    does. It lies in [0, 1]: near 0 for independent samples, 1 when ``z`` is
    a similarity transform of ``x`` (for instance ``a * x + b``), and 0 when
    either batch is constant.

    It is differentiable everywhere: coinciding samples (the diagonal, or two
    identical rows) and a zero correlation get zero gradients, not NaN. It
    runs inside `tf.function` with a dynamic batch size.

    Args:
      x: a batch of shape ``[n, ...]``; the first axis indexes samples and all
        other axes are flattened into one feature vector per sample.
      z: a batch with the same number of samples ``n``, any other shape.

    Returns:
      A scalar tensor: float64 if ``x`` or ``z`` is, else float32 (integer
      and 16-bit float inputs are computed in float32, since the Gram-matrix
      distances lose too many digits in half precision).

    Raises:
      ValueError: a batch is a scalar, or the static batch sizes differ.
    """
    x, z = _as_batches(x, z)
    a, b = _centred_distances(x), _centred_distances(z)
    dcov2 = tf.maximum(tf.reduce_mean(a * b), 0.0)
    # sqrt(dVar²(x)) * sqrt(dVar²(z)), not sqrt of the product: the product of
    # two small variances can underflow in float32.
    dvar2_x, dvar2_z = tf.reduce_mean(a * a), tf.reduce_mean(b * b)
    varies = tf.logical_and(dvar2_x > 0.0, dvar2_z > 0.0)
    denominator = _safe_sqrt(dvar2_x, varies) * _safe_sqrt(dvar2_z, varies)
    ratio = dcov2 / tf.where(varies, denominator, tf.ones_like(denominator))
    # Rounding can push dCor² of a similarity transform just above 1.
    dcor2 = tf.where(varies, tf.minimum(ratio, 1.0), tf.zeros_like(ratio))
    return _safe_sqrt(dcor2, dcor2 > 0.0)
