"""Distance correlation: agrees with `dcor`, its invariances, its gradients."""

import dcor
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.privacy import distance_correlation, distance_covariance_squared
from tests import base


def _reference(x, z):
    """dcor's biased dCor, computed by its naive O(n²) method in float64."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    return dcor.distance_correlation(x, z, method="naive")


def _pair(kind, n, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape))
    if kind == "square":  # dependent, but not linearly
        z = x**2
    elif kind == "noisy":
        mixing = rng.standard_normal((x[0].size, 5))
        z = np.tanh(x.reshape(n, -1) @ mixing) + 0.5 * rng.standard_normal((n, 5))
    else:  # independent
        z = rng.uniform(size=(n, 4, 2))
    return x, z


class AgreesWithDcorTest(base.TestCase):
    @parameterized.product(
        kind=["square", "noisy", "independent"],
        n_shape=[(8, (3,)), (16, (1,)), (33, (6,)), (64, (8, 8, 1)), (24, (5, 5, 3))],
    )
    def test_matches_reference(self, kind, n_shape):
        n, shape = n_shape
        x, z = _pair(kind, n, shape, seed=n)
        got = distance_correlation(tf.constant(x), tf.constant(z))
        self.assertEqual(got.dtype, tf.float64)
        self.assertAlmostEqual(float(got), _reference(x, z), delta=1e-6)

    def test_returns_dcor_not_its_square(self):
        x, z = _pair("noisy", 32, (4,), seed=0)
        got = float(distance_correlation(x, z))
        dcor2 = dcor.distance_correlation_sqr(x, z, method="naive")
        self.assertAlmostEqual(got, np.sqrt(dcor2), delta=1e-9)
        self.assertGreater(abs(got - dcor2), 0.05)

    def test_distance_covariance_squared_matches_reference(self):
        x, z = _pair("square", 20, (3,), seed=1)
        got = float(distance_covariance_squared(x, z))
        self.assertAlmostEqual(got, dcor.distance_covariance_sqr(x, z), delta=1e-9)

    def test_dependent_pair_scores_above_independent_pair(self):
        # Uncorrelated (x, x**2) is still dependent; the biased estimator of an
        # independent pair shrinks like 1/sqrt(n), hence n = 256.
        rng = np.random.default_rng(2)
        x, w = rng.standard_normal((2, 256, 2))
        self.assertLess(abs(np.corrcoef(x[:, 0], x[:, 0] ** 2)[0, 1]), 0.2)
        self.assertGreater(float(distance_correlation(x, x**2)), 0.4)
        self.assertLess(float(distance_correlation(x, w)), 0.2)

    def test_float32_half_and_int_inputs(self):
        x, z = _pair("noisy", 32, (6,), seed=4)
        got = distance_correlation(x.astype("float32"), z.astype("float32"))
        self.assertEqual(got.dtype, tf.float32)
        self.assertAlmostEqual(float(got), _reference(x, z), delta=1e-5)
        for half in (tf.float16, tf.bfloat16):  # widened, not computed in half
            got = distance_correlation(tf.cast(x, half), tf.cast(z, half))
            self.assertEqual(got.dtype, tf.float32)
            self.assertAlmostEqual(float(got), _reference(x, z), delta=0.02)
        ints = np.arange(40).reshape(10, 4) % 7
        got = distance_correlation(ints, ints**2)
        self.assertEqual(got.dtype, tf.float32)
        self.assertAlmostEqual(float(got), _reference(ints, ints**2), delta=1e-5)


class PropertiesTest(base.TestCase):
    @parameterized.parameters((3.0, 5.0), (-0.01, 100.0), (1e4, -1e4))
    def test_invariant_to_scaling_and_translating_z(self, scale, shift):
        x, z = _pair("noisy", 40, (3,), seed=5)
        expected = float(distance_correlation(x, z))
        got = float(distance_correlation(x, scale * z + shift))
        self.assertAlmostEqual(got, expected, delta=1e-9)

    @parameterized.parameters((2.0, 1.0), (-0.5, 3.0), (1e3, -7.0))
    def test_similarity_transform_scores_one(self, a, b):
        x = np.random.default_rng(6).standard_normal((30, 2, 3))
        self.assertAlmostEqual(float(distance_correlation(x, a * x + b)), 1.0, 6)
        x32 = x.astype("float32")
        self.assertAlmostEqual(float(distance_correlation(x32, a * x32 + b)), 1.0, 5)

    def test_constant_batch_scores_zero(self):
        z = np.random.default_rng(7).standard_normal((9, 3))
        self.assertEqual(float(distance_correlation(np.full((9, 4), 0.1), z)), 0.0)
        self.assertEqual(float(distance_correlation(z, np.zeros((9, 1)))), 0.0)

    def test_different_batch_sizes_are_an_error(self):
        with self.assertRaisesRegex(ValueError, "same number of samples"):
            distance_correlation(np.zeros((4, 2)), np.zeros((5, 2)))


class GradientTest(base.TestCase):
    def _xz(self):
        rng = np.random.default_rng(8)
        return tf.constant(rng.standard_normal((6, 3))), tf.constant(
            rng.standard_normal((6, 2))
        )

    def test_matches_numerical_gradient(self):
        x, z = self._xz()
        for f, arg in [
            (lambda a: distance_correlation(a, z), x),
            (lambda b: distance_correlation(x, b), z),
        ]:
            theoretical, numerical = tf.test.compute_gradient(f, [arg])
            self.assertLessEqual(np.abs(theoretical[0] - numerical[0]).max(), 1e-5)

    def test_identical_rows_give_finite_gradients(self):
        x, z = self._xz()
        x = tf.concat([x[:1], x[:1], x[1:4], x[3:4]], axis=0)  # rows 0=1, 4=5
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, z])
            value = distance_correlation(x, z)
            constant = distance_correlation(tf.ones_like(x) * x[:1], z)
        for grad in tape.gradient(value, [x, z]) + tape.gradient(constant, [x, z]):
            self.assertTrue(np.all(np.isfinite(grad.numpy())), grad)
        # |x0 - x1| is symmetric about the tie, so central differences see
        # the zero subgradient the function returns there.
        for f, arg in [
            (lambda a: distance_correlation(a, z), x),
            (lambda b: distance_correlation(x, b), z),
        ]:
            theoretical, numerical = tf.test.compute_gradient(f, [arg])
            self.assertLessEqual(np.abs(theoretical[0] - numerical[0]).max(), 1e-5)

    def test_runs_in_tf_function_with_dynamic_batch(self):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 4, 4, 1], tf.float32),
                tf.TensorSpec([None, 3], tf.float32),
            ]
        )
        def loss_and_grad(x, z):
            with tf.GradientTape() as tape:
                tape.watch(z)
                value = distance_correlation(x, z)
            return value, tape.gradient(value, z)

        rng = np.random.default_rng(9)
        for n in (5, 17):
            x = rng.standard_normal((n, 4, 4, 1)).astype("float32")
            z = rng.standard_normal((n, 3)).astype("float32")
            value, grad = loss_and_grad(x, z)
            self.assertAlmostEqual(float(value), _reference(x, z), delta=1e-5)
            self.assertEqual(grad.shape, (n, 3))
            self.assertTrue(np.all(np.isfinite(grad.numpy())))
        self.assertEqual(loss_and_grad.experimental_get_tracing_count(), 1)
