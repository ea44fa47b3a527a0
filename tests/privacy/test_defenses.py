"""NoPeek, activation noise and label protection inside the client's step."""

import glob
import json
import os
import types
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras import experiment
from splitkeras.configs import fashion_mnist_lenet
from splitkeras.cut import cut
from splitkeras.parties import Client
from splitkeras.parties.handoff import pack_state, state_variables
from splitkeras.privacy.attacks.reconstruction import reconstruction_attack
from splitkeras.privacy.defenses import (
    ClientPrivacy,
    NoPeekTerm,
    flat_batch,
    from_config,
)
from splitkeras.privacy.distance_correlation import distance_correlation
from splitkeras.privacy.leakage import (
    Leakage,
    images_of,
    near_chance_warning,
    privacy_warnings,
)
from splitkeras.studies.privacy_report import restore_client_segment
from splitkeras.transport.sealing import unpack_arrays
from tests import base
from tests.privacy.tiny import tiny_lenet
from tests.test_experiment import _write_npz


def _segments():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(4, name="logits")(h)
    return cut(keras.Model(inputs, outputs), "conv")


def _client(privacy):
    segments = _segments()
    client = Client(segments.client, keras.optimizers.SGD(1.0), privacy=privacy)
    client.build_optimizer()
    return client


class DefensesTest(base.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = tf.constant(rng.random((16, 6, 6, 1)), tf.float32)
        self.g = tf.constant(rng.normal(size=(16, 4, 4, 3)) * 0.1, tf.float32)

    def _update(self, privacy):
        """Weights before, after one backward with server gradients self.g."""
        client = _client(privacy)
        before = [v.numpy() for v in client.segment.trainable_variables]
        client.backward(client.forward(self.x), [self.g])
        after = [v.numpy() for v in client.segment.trainable_variables]
        return client, before, after

    def _task_and_leak(self, g):
        """Task and dCor gradients of a fresh client (same seed), apart."""
        fresh = _client(None)
        variables = fresh.segment.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            a = fresh.segment(self.x, training=True)
            dcor = distance_correlation(flat_batch(self.x), flat_batch(a))
        task = tape.gradient(a, variables, output_gradients=g)
        leak = tape.gradient(dcor, variables)
        self.assertGreater(float(dcor), 0.1)
        return [t.numpy() for t in task], [v.numpy() for v in leak]

    def test_nopeek_defaults(self):
        privacy = fashion_mnist_lenet.get_config().privacy
        self.assertEqual(
            (privacy.nopeek_step, privacy.nopeek_window, privacy.nopeek_reencode),
            ("normalized", 256, False),
        )

    def test_nopeek_loss_step_is_task_plus_alpha_dcor_gradient(self):
        alpha = 0.7
        privacy = ClientPrivacy(nopeek_alpha=alpha, nopeek_step="loss", nopeek_window=0)
        client, before, after = self._update(privacy)
        task, leak = self._task_and_leak(self.g)
        for w0, w1, gt, gl in zip(before, after, task, leak):
            # SGD(1.0): the update is minus the gradient.
            np.testing.assert_allclose(w0 - w1, gt + alpha * gl, atol=1e-5)
            self.assertGreater(float(np.max(np.abs(gl))), 0.0)

    def test_normalized_step_is_alpha_times_the_task_norm_conflicts_projected(self):
        alpha = 0.7
        conflicts = []
        # The task gradient is linear in the server's gradients: one of g and
        # -g conflicts with dCor's gradient (negative dot product).
        for g in (self.g, -self.g):
            self.g = g
            privacy = ClientPrivacy(nopeek_alpha=alpha, nopeek_window=0)
            _, before, after = self._update(privacy)
            task, leak = self._task_and_leak(g)
            t = np.concatenate([v.ravel() for v in task])
            lk = np.concatenate([v.ravel() for v in leak])
            dot = float(t @ lk)
            conflicts.append(dot < 0)
            if dot < 0:  # projected out: the privacy step is orthogonal to task
                lk = lk - dot / float(t @ t) * t
            step = alpha * np.linalg.norm(t) / np.linalg.norm(lk) * lk
            update = np.concatenate(
                [(w0 - w1).ravel() for w0, w1 in zip(before, after)]
            )
            np.testing.assert_allclose(update, t + step, atol=1e-5)
            privacy_part = update - t
            self.assertAlmostEqual(
                float(np.linalg.norm(privacy_part)),
                alpha * float(np.linalg.norm(t)),
                delta=1e-4,
            )
            if dot < 0:
                self.assertAlmostEqual(float(privacy_part @ t), 0.0, delta=1e-5)
        self.assertEqual(sorted(conflicts), [False, True])

    def test_normalized_step_is_zero_without_a_task_gradient(self):
        self.g = tf.zeros_like(self.g)
        _, before, after = self._update(ClientPrivacy(nopeek_alpha=5.0))
        self.assertWeightsClose(after, before, atol=0.0)

    def test_target_gates_the_privacy_part_on_the_steps_dcor(self):
        # The step's dCor (no window), on the same fresh client.
        cut = _client(None).segment(self.x, training=True)
        dcor = float(distance_correlation(flat_batch(self.x), flat_batch(cut)))
        task, _ = self._task_and_leak(self.g)
        _, before, free = self._update(ClientPrivacy(nopeek_alpha=0.7, nopeek_window=0))
        below = ClientPrivacy(nopeek_alpha=0.7, nopeek_window=0, nopeek_target=0.1)
        above = ClientPrivacy(
            nopeek_alpha=0.7, nopeek_window=0, nopeek_target=min(dcor + 0.01, 0.999)
        )
        self.assertLess(0.1, dcor)
        # dCor above the target: the same step as without one.
        self.assertWeightsClose(self._update(below)[2], free, atol=1e-6)
        # At or below it: the task's step alone (SGD(1.0)).
        _, _, held = self._update(above)
        for w0, w1, t in zip(before, held, task):
            np.testing.assert_allclose(w0 - w1, t, atol=1e-6)
        self.assertGreater(
            max(float(np.max(np.abs(a - b))) for a, b in zip(free, held)), 1e-4
        )

    def test_warmup_leaves_the_first_updates_to_the_task(self):
        warm = ClientPrivacy(nopeek_alpha=0.7, nopeek_window=0, nopeek_warmup=1)
        client, before, first = self._update(warm)
        task, _ = self._task_and_leak(self.g)
        for w0, w1, t in zip(before, first, task):  # SGD(1.0): minus the task's
            np.testing.assert_allclose(w0 - w1, t, atol=1e-6)
        # The second update is the normalized step, as a client without a
        # warm-up takes it from the same weights.
        client.backward(client.forward(self.x), [self.g])
        pushing = _client(ClientPrivacy(nopeek_alpha=0.7, nopeek_window=0))
        for v, w in zip(pushing.segment.trainable_variables, first):
            v.assign(w)
        pushing.backward(pushing.forward(self.x), [self.g])
        second = [v.numpy() for v in client.segment.trainable_variables]
        expected = [v.numpy() for v in pushing.segment.trainable_variables]
        self.assertWeightsClose(second, expected, atol=1e-6)
        # ... which is not the task's alone.
        alone = _client(None)
        for v, w in zip(alone.segment.trainable_variables, first):
            v.assign(w)
        alone.backward(alone.forward(self.x), [self.g])
        task_only = [v.numpy() for v in alone.segment.trainable_variables]
        self.assertGreater(
            max(float(np.max(np.abs(a - b))) for a, b in zip(second, task_only)),
            1e-4,
        )

    def test_target_outside_0_1_or_gates_with_the_loss_step_are_refused(self):
        with self.assertRaisesRegex(
            ValueError,
            r"^nopeek_target is a distance correlation in \[0, 1\), got 1.0$",
        ):
            ClientPrivacy(nopeek_alpha=1.0, nopeek_target=1.0)
        with self.assertRaisesRegex(
            ValueError,
            "^nopeek_target=0.5 gates the normalized step's privacy part: set "
            "nopeek_step='normalized', not 'loss'$",
        ):
            ClientPrivacy(nopeek_alpha=1.0, nopeek_step="loss", nopeek_target=0.5)
        with self.assertRaisesRegex(
            ValueError,
            "^nopeek_warmup=100 gates the normalized step's privacy part: set "
            "nopeek_step='normalized', not 'loss'$",
        ):
            ClientPrivacy(nopeek_alpha=1.0, nopeek_step="loss", nopeek_warmup=100)
        with self.assertRaisesRegex(
            ValueError,
            "^nopeek_adapt=0.01 gates the normalized step's privacy part: set "
            "nopeek_step='normalized', not 'loss'$",
        ):
            ClientPrivacy(
                nopeek_alpha=1.0,
                nopeek_step="loss",
                nopeek_target=0.0,
                nopeek_adapt=0.01,
            )
        with self.assertRaisesRegex(
            ValueError,
            "^nopeek_adapt=0.01 moves alpha toward nopeek_target: set "
            "nopeek_target too$",
        ):
            ClientPrivacy(nopeek_alpha=1.0, nopeek_adapt=0.01)
        with self.assertRaisesRegex(ValueError, "^nopeek_adapt must be >= 0, got -1$"):
            ClientPrivacy(nopeek_alpha=1.0, nopeek_target=0.5, nopeek_adapt=-1)

    def test_adapt_moves_alpha_by_the_steps_distance_to_the_target(self):
        cut = _client(None).segment(self.x, training=True)
        dcor = float(distance_correlation(flat_batch(self.x), flat_batch(cut)))
        target, rate = dcor / 2, 0.5
        adapting = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_window=0, nopeek_target=target, nopeek_adapt=rate
        )
        client, _, first = self._update(adapting)
        # The first update is taken with alpha 0.5, as without adapting ...
        fixed = ClientPrivacy(nopeek_alpha=0.5, nopeek_window=0, nopeek_target=target)
        self.assertWeightsClose(first, self._update(fixed)[2], atol=1e-6)
        # ... then alpha grows by exp(rate x (dCor - target)).
        grown = 0.5 * np.exp(rate * (dcor - target))
        self.assertAlmostEqual(adapting.adapted_alpha, grown, places=5)
        # The second update is the normalized step at the grown alpha.
        client.backward(client.forward(self.x), [self.g])
        second = [v.numpy() for v in client.segment.trainable_variables]
        at_grown = _client(
            ClientPrivacy(nopeek_alpha=grown, nopeek_window=0, nopeek_target=target)
        )
        for v, w in zip(at_grown.segment.trainable_variables, first):
            v.assign(w)
        at_grown.backward(at_grown.forward(self.x), [self.g])
        expected = [v.numpy() for v in at_grown.segment.trainable_variables]
        self.assertWeightsClose(second, expected, atol=1e-6)

    def test_adapted_alpha_stays_within_its_bounds(self):
        def after_one_step(target, rate, **settings):
            privacy = ClientPrivacy(
                nopeek_alpha=0.5,
                nopeek_window=0,
                nopeek_target=target,
                nopeek_adapt=rate,
                **settings,
            )
            self._update(privacy)
            return privacy

        # Below the target alpha falls, but not under nopeek_alpha.
        self.assertEqual(after_one_step(0.999, 5.0).adapted_alpha, 0.5)
        # Far above it, it rises to ADAPT_MAX (10) times nopeek_alpha.
        self.assertEqual(after_one_step(0.01, 100.0).adapted_alpha, 5.0)
        # Not during the warm-up, nor when the update is skipped.
        self.assertEqual(
            after_one_step(0.01, 100.0, nopeek_warmup=1).adapted_alpha, 0.5
        )
        privacy = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_window=0, nopeek_target=0.01, nopeek_adapt=100.0
        )
        client = _client(privacy)
        privacy.remember(client.forward(self.x).nopeek, applied=tf.constant(False))
        self.assertEqual(privacy.adapted_alpha, 0.5)
        privacy.remember(client.forward(self.x).nopeek, applied=tf.constant(True))
        self.assertEqual(privacy.adapted_alpha, 5.0)
        # Without nopeek_adapt, nothing adapts.
        self.assertIsNone(ClientPrivacy(nopeek_alpha=0.5).adapted_alpha)

    def test_adapted_alpha_rises_above_the_target_and_eases_below_it(self):
        privacy = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_window=0, nopeek_target=0.5, nopeek_adapt=2.0
        )

        def step(dcor):
            privacy.remember(NoPeekTerm(tf.constant(dcor), None, None))
            return privacy.adapted_alpha

        self.assertAlmostEqual(step(0.9), 0.5 * np.exp(2.0 * 0.4), places=5)
        self.assertAlmostEqual(step(0.3), 0.5 * np.exp(2.0 * 0.2), places=5)
        self.assertAlmostEqual(step(float("nan")), 0.5 * np.exp(2.0 * 0.2), places=5)

    def test_adapting_starts_with_the_first_update_past_the_warmup(self):
        privacy = ClientPrivacy(
            nopeek_alpha=0.5,
            nopeek_window=0,
            nopeek_target=0.01,
            nopeek_adapt=100.0,
            nopeek_warmup=1,
        )
        client = _client(privacy)
        client.backward(client.forward(self.x), [self.g])
        self.assertEqual(privacy.adapted_alpha, 0.5)
        client.backward(client.forward(self.x), [self.g])
        self.assertEqual(privacy.adapted_alpha, 5.0)

    def test_adapted_alpha_is_in_the_clients_checkpoint(self):
        privacy = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_target=0.01, nopeek_adapt=100.0
        )
        client = _client(privacy)
        path = client.checkpoint().write(os.path.join(self.tempdir(), "ckpt"))
        client.backward(client.forward(self.x), [self.g])
        self.assertEqual(privacy.adapted_alpha, 5.0)
        client.checkpoint().read(path).assert_existing_objects_matched()
        self.assertEqual(privacy.adapted_alpha, 0.5)
        # Like the window, it is not in the state round robin hands on.
        self.assertEqual(
            len(unpack_arrays(pack_state(client))), len(state_variables(_client(None)))
        )

    def _reencoded(self, client, x1, x2):
        """(the client's estimate and its gradient for batch x2 with x1 in
        the window, the same by hand: every row in inference mode, the
        stored window's estimate, the training-mode batch against the
        inference-mode window)."""
        client.backward(client.forward(x1), [self.g])  # x1 joins the window
        _, z_memory, filled = client.privacy._memory
        self.assertEqual(int(filled), 16)
        variables = client.segment.trainable_variables
        forward = client.forward(x2)
        got = forward.tape.gradient(forward.nopeek.dcor, variables)
        rows = tf.concat([flat_batch(x2), flat_batch(x1)], 0)
        with tf.GradientTape() as tape:
            z = client.segment(tf.concat([x2, x1], 0), training=False)
            expected = distance_correlation(rows, flat_batch(z))
        self.assertAlmostEqual(float(forward.nopeek.dcor), float(expected), places=6)
        self.assertWeightsClose(
            [g.numpy() for g in got],
            [g.numpy() for g in tape.gradient(expected, variables)],
            atol=1e-6,
        )
        z2 = flat_batch(client.segment(x2, training=True))
        stale = distance_correlation(rows, tf.concat([z2, z_memory[:16]], 0))
        mixed = distance_correlation(
            rows, tf.concat([z2, flat_batch(client.segment(x1, training=False))], 0)
        )
        return float(expected), float(stale), float(mixed)

    def test_reencoded_window_is_encoded_by_the_current_client(self):
        privacy = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_window=16, nopeek_reencode=True
        )
        expected, stale, _ = self._reencoded(
            _client(privacy), self.x, self.x[::-1] * 0.5
        )
        # The stored window holds x1's cut tensors from before the update:
        # the estimate without re-encoding differs.
        self.assertGreater(abs(stale - expected), 1e-4)

    def test_reencoding_treats_batch_and_window_alike_under_batch_norm(self):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(3, 3, name="conv")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.Dropout(0.5, name="drop")(h)
        h = keras.layers.ReLU(name="relu")(h)
        outputs = keras.layers.Dense(4, name="logits")(keras.layers.Flatten()(h))
        segments = cut(keras.Model(inputs, outputs), "relu")
        privacy = ClientPrivacy(
            nopeek_alpha=0.5, nopeek_window=16, nopeek_reencode=True
        )
        client = Client(segments.client, keras.optimizers.SGD(1.0), privacy=privacy)
        client.build_optimizer()
        expected, _, mixed = self._reencoded(client, self.x, self.x[::-1] * 0.5)
        # A training-mode batch against an inference-mode window is another
        # estimate.
        self.assertGreater(abs(mixed - expected), 1e-3)

    def test_reencoding_needs_a_window_an_encoder_and_one_input(self):
        with self.assertRaisesRegex(
            ValueError,
            "^nopeek_reencode encodes the window's rows again: set nopeek_window > 0$",
        ):
            ClientPrivacy(nopeek_alpha=0.5, nopeek_window=0, nopeek_reencode=True)
        privacy = ClientPrivacy(nopeek_alpha=0.5, nopeek_reencode=True)
        cut = (tf.zeros([16, 4]),)
        with self.assertRaisesRegex(
            ValueError,
            "^nopeek_reencode encodes the window's inputs with the client: it "
            "needs a client of one input tensor$",
        ):
            privacy.protect_activations((self.x, self.x), cut, None, encode=tuple)
        with self.assertRaisesRegex(
            ValueError,
            r"^nopeek_reencode needs the client's encoder: "
            r"protect_activations\(\.\.\., encode=\.\.\.\)$",
        ):
            privacy.protect_activations(self.x, cut, None)

    def test_config_turns_reencoding_on(self):
        c = fashion_mnist_lenet.get_config()
        c.privacy.nopeek_alpha = 0.5
        c.privacy.nopeek_reencode = True
        self.assertTrue(from_config(c).nopeek_reencode)

    def test_window_holds_the_last_rows_of_applied_steps(self):
        privacy = ClientPrivacy(nopeek_alpha=0.5, nopeek_window=20)
        client = _client(privacy)
        x1, x2 = self.x, self.x[::-1] * 0.5
        z1 = flat_batch(client.segment(x1, training=True)).numpy()
        client.backward(client.forward(x1), [self.g])
        x_memory, z_memory, filled = privacy._memory
        self.assertEqual(int(filled), 16)
        np.testing.assert_allclose(x_memory[:16], flat_batch(x1))
        np.testing.assert_allclose(z_memory[:16], z1, atol=1e-6)
        # A forward pass whose step is not applied (an asynchronous step's
        # first pass), or an update skipped on overflow, leaves the window.
        skipped = client.forward(x2)
        self.assertEqual(int(filled), 16)
        privacy.remember(skipped.nopeek, applied=tf.constant(False))
        self.assertEqual(int(filled), 16)
        np.testing.assert_allclose(x_memory[:16], flat_batch(x1))
        forward = client.forward(x2)
        z2 = flat_batch(forward.cut).numpy()
        # This step's dCor is over its batch and the window's 16 rows.
        expected = distance_correlation(
            np.concatenate([flat_batch(x2), flat_batch(x1)]), np.concatenate([z2, z1])
        )
        self.assertAlmostEqual(float(forward.nopeek.dcor), float(expected), places=5)
        client.backward(forward, [self.g])
        # 20 rows: the newest batch first, then the first 4 rows of the one before.
        self.assertEqual(int(filled), 20)
        np.testing.assert_allclose(
            x_memory, np.concatenate([flat_batch(x2), flat_batch(x1)[:4]])
        )

    def test_unknown_nopeek_step_is_refused(self):
        with self.assertRaisesRegex(
            ValueError, "^nopeek_step must be one of normalized, loss, got 'sum'$"
        ):
            ClientPrivacy(nopeek_alpha=1.0, nopeek_step="sum")

    def test_activation_noise_is_sent_but_does_not_change_the_gradient(self):
        sigma = 0.5
        noisy = _client(ClientPrivacy(activation_noise=sigma, seed=1))
        clean = _client(None)
        sent = noisy.forward(self.x).cut[0]
        true = clean.segment(self.x, training=True)
        noise = (sent - true).numpy()
        self.assertAlmostEqual(float(noise.std()), sigma, delta=0.05)
        self.assertAlmostEqual(float(noise.mean()), 0.0, delta=0.05)
        # The noise is a constant for the gradient: same update as clean.
        _, _, after_noisy = self._update(ClientPrivacy(activation_noise=sigma))
        _, _, after_clean = self._update(None)
        self.assertWeightsClose(after_noisy, after_clean, atol=1e-6)
        # Inference (what the server sees at evaluation) is noised too.
        self.assertGreater(
            float(
                tf.reduce_max(tf.abs(noisy.infer(self.x)[0] - clean.infer(self.x)[0]))
            ),
            0.1,
        )

    def test_gradient_protection_clips_and_noises_per_example(self):
        g = tf.constant(np.random.default_rng(1).normal(size=(32, 10)), tf.float32)
        clipped = ClientPrivacy(gradient_max_norm=0.5).protect_gradients([g])[0]
        norms = tf.norm(clipped, axis=1).numpy()
        self.assertLessEqual(norms.max(), 0.5 + 1e-5)
        # Clipping keeps directions.
        cosine = tf.reduce_sum(
            tf.math.l2_normalize(g, 1) * tf.math.l2_normalize(clipped, 1), 1
        )
        np.testing.assert_allclose(cosine.numpy(), 1.0, atol=1e-5)
        small = g * 1e-3  # under the bound: unchanged
        np.testing.assert_allclose(
            ClientPrivacy(gradient_max_norm=0.5).protect_gradients([small])[0], small
        )
        noised = ClientPrivacy(gradient_noise=0.2).protect_gradients([g * 0.0])[0]
        self.assertAlmostEqual(float(tf.math.reduce_std(noised)), 0.2, delta=0.03)

    def test_negative_settings_are_refused(self):
        with self.assertRaisesRegex(ValueError, "nopeek_alpha must be >= 0, got -1"):
            ClientPrivacy(nopeek_alpha=-1)


class LeakageInExperimentTest(base.TestCase):
    def test_summary_has_leakage_and_noise_lowers_it(self):
        root = self.tempdir()
        npz = _write_npz(os.path.join(root, "tiny.npz"))
        results = {}
        for name, noise in (("plain", 0.0), ("noised", 2.0)):
            c = fashion_mnist_lenet.get_config()
            c.data.path = npz
            c.train.epochs = 1
            c.train.batch_size = 64
            c.privacy.activation_noise = noise
            c.privacy.nopeek_alpha = 0.1
            workdir = os.path.join(root, name)
            results[name] = experiment.train_and_evaluate(c, workdir)
            with open(os.path.join(workdir, "summary.json")) as f:
                self.assertEqual(json.load(f)["privacy"]["activation_noise"], noise)
        plain, noised = (
            results["plain"]["leakage_dcor"],
            results["noised"]["leakage_dcor"],
        )
        self.assertGreater(plain, 0.5)
        self.assertLess(noised, plain - 0.2)

    def test_adapted_alpha_is_in_the_summary_tensorboard_and_checkpoint(self):
        root = self.tempdir()
        c = tiny_lenet(
            root,
            **{
                "train.epochs": 1,
                "train.batch_size": 64,
                "privacy.nopeek_alpha": 0.5,
                "privacy.nopeek_target": 0.01,
                "privacy.nopeek_adapt": 100.0,
            },
        )
        run = os.path.join(root, "run")
        summary = experiment.train_and_evaluate(c, run)
        # Far above the target, alpha rose to its bound, 10 x 0.5.
        self.assertEqual(summary["nopeek_adapted_alpha"], 5.0)
        values = {
            float(tf.make_ndarray(v.tensor))
            for path in glob.glob(os.path.join(run, "validation", "events*"))
            for event in tf.compat.v1.train.summary_iterator(path)
            for v in event.summary.value
            if v.tag == "nopeek_adapted_alpha"
        }
        self.assertEqual(values, {5.0})
        reader = tf.train.load_checkpoint(
            tf.train.latest_checkpoint(os.path.join(run, "checkpoints", "client_0"))
        )
        self.assertEqual(
            float(reader.get_tensor("nopeek/nopeek_alpha/.ATTRIBUTES/VARIABLE_VALUE")),
            5.0,
        )


class PrivacyWarningsTest(base.TestCase):
    def test_constant_cut_output_is_a_collapse(self):
        rows = np.full((8, 5), 0.25)
        self.assertEqual(
            privacy_warnings(rows, 0.0, 0.98, nopeek_alpha=2.0),
            [
                "the client has collapsed: its cut output is the same for all 8 "
                "leakage examples, so the server learns nothing from the inputs "
                "(leakage_dcor 0.000 here is not privacy); lower "
                "config.privacy.nopeek_alpha (now 2)"
            ],
        )
        (without_nopeek,) = privacy_warnings(rows * 0, 0.0, None, nopeek_alpha=0.0)
        self.assertTrue(
            without_nopeek.endswith(
                "(leakage_dcor 0.000 here is not privacy); check the learning "
                "rate and the client's activations"
            ),
            without_nopeek,
        )

    def test_nopeek_that_has_not_moved_dcor_is_told(self):
        rows = np.random.default_rng(0).random((8, 5))
        self.assertEqual(
            privacy_warnings(rows, 0.90, 0.98, nopeek_alpha=0.5),
            [
                "NoPeek is on (config.privacy.nopeek_alpha=0.5) but leakage_dcor "
                "0.900 is -8% from the untrained client's 0.980 (not 10% lower): "
                "the cut leaks about as much as without it; raise nopeek_alpha "
                "or train longer"
            ],
        )
        # Risen: the sign says so.
        (risen,) = privacy_warnings(rows, 0.99, 0.98, nopeek_alpha=0.5)
        self.assertIn("leakage_dcor 0.990 is +1% from the untrained", risen)
        # 10% or more below the start, or NoPeek off: nothing to tell.
        self.assertEqual(privacy_warnings(rows, 0.88, 0.98, nopeek_alpha=0.5), [])
        self.assertEqual(privacy_warnings(rows, 0.98, 0.98, nopeek_alpha=0.0), [])

    def test_nopeek_near_chance_is_told_unless_the_client_collapsed(self):
        self.assertEqual(
            near_chance_warning(0.125, 10, nopeek_alpha=0.5),
            [
                "NoPeek (config.privacy.nopeek_alpha=0.5) left the model near "
                "chance: accuracy 0.125 against 0.100 for 10 classes, so the "
                "client's low leakage comes with nothing learned; lower "
                "nopeek_alpha or set config.privacy.nopeek_target"
            ],
        )
        # At 1.5 x chance or above, without NoPeek, or unknown: nothing.
        self.assertEqual(near_chance_warning(0.15, 10, nopeek_alpha=0.5), [])
        self.assertEqual(near_chance_warning(0.1, 10, nopeek_alpha=0.0), [])
        self.assertEqual(near_chance_warning(None, 10, nopeek_alpha=0.5), [])
        # In the leakage measurement: given the test accuracy.
        c = fashion_mnist_lenet.get_config()
        c.privacy.leakage_examples = 16
        rng = np.random.default_rng(0)
        arrays = types.SimpleNamespace(
            x_test=rng.integers(0, 255, (16, 6, 6, 1)).astype(np.uint8),
            y_test=rng.integers(0, 4, 16),
            num_classes=4,
        )
        trainer = types.SimpleNamespace(client=_client(ClientPrivacy(nopeek_alpha=0.5)))
        leakage = Leakage(c, arrays)
        leakage(trainer, accuracy=0.3)  # chance 0.25: below 0.375
        self.assertEqual(
            leakage.warnings, near_chance_warning(0.3, 4, nopeek_alpha=0.5)
        )
        leakage(trainer, accuracy=0.4)
        self.assertEqual(leakage.warnings, [])
        # A collapsed client is told as collapsed, not twice.
        conv = trainer.client.segment.get_layer("conv")
        conv.kernel.assign(tf.zeros_like(conv.kernel))
        conv.bias.assign(-tf.ones_like(conv.bias))
        leakage(trainer, accuracy=0.25)
        (told,) = leakage.warnings
        self.assertTrue(told.startswith("the client has collapsed"), told)

    def test_a_collapsed_client_is_warned_in_the_log_and_the_summary(self):
        root = self.tempdir()
        c = tiny_lenet(
            root,
            **{"train.epochs": 1, "train.batch_size": 64, "privacy.nopeek_alpha": 1.0},
        )
        start_process = experiment.InProcess.__init__

        def collapsed(process, config, schedule, *args, **kwargs):
            # After the untrained client's leakage is measured, every conv1
            # unit dies: ReLU(0 * x - 1) = 0 for every input, and no
            # gradient ever reaches conv1 again.
            start_process(process, config, schedule, *args, **kwargs)
            conv1 = schedule.clients[0].segment.get_layer("conv1")
            conv1.kernel.assign(tf.zeros_like(conv1.kernel))
            conv1.bias.assign(-tf.ones_like(conv1.bias))

        measure = Leakage.__call__
        accuracies = []

        def measured(leakage, trainer, accuracy=None):
            accuracies.append(accuracy)
            return measure(leakage, trainer, accuracy)

        with (
            mock.patch.object(experiment.InProcess, "__init__", collapsed),
            mock.patch.object(Leakage, "__call__", measured),
            self.assertLogs("splitkeras", "WARNING") as logs,
        ):
            summary = experiment.train_and_evaluate(c, os.path.join(root, "run"))
        # Each measurement is given the test accuracy (near_chance_warning).
        self.assertEqual(accuracies[-1], summary["test_accuracy"])
        message = (
            "the client has collapsed: its cut output is the same for all 64 "
            "leakage examples, so the server learns nothing from the inputs "
            "(leakage_dcor 0.000 here is not privacy); lower "
            "config.privacy.nopeek_alpha (now 1)"
        )
        self.assertEqual(summary["privacy_warnings"], [message])
        self.assertEqual(summary["leakage_dcor"], 0.0)
        # Against the untrained client's (measured before the hook's change).
        self.assertGreater(summary["leakage_dcor_start"], 0.5)
        self.assertEqual(summary["leakage_dcor_change"], -1.0)
        self.assertIn("WARNING:splitkeras:Privacy: " + message, logs.output)
        with open(os.path.join(root, "run", "summary.json")) as f:
            self.assertEqual(json.load(f)["privacy_warnings"], [message])


class ReconstructionInRunTest(base.TestCase):
    def test_a_run_ends_with_the_attack_in_tensorboard_and_the_summary(self):
        root = self.tempdir()
        c = tiny_lenet(
            root,
            **{
                "train.epochs": 1,
                "train.batch_size": 64,
                "privacy.leakage_examples": 16,
                "privacy.reconstruction_examples": 48,
                "privacy.reconstruction_epochs": 2,
            },
        )
        run = os.path.join(root, "run")
        summary = experiment.train_and_evaluate(c, run)
        # The attack on the trained client: a decoder on the first 48
        # training examples' cut outputs, scored on test examples 16-31.
        arrays = data_lib.load(c.data.name, c.data.path, c.data.download)
        segment = restore_client_segment(c, run, arrays)
        again = reconstruction_attack(
            segment,
            images_of(arrays.x_train[:48], arrays.y_train[:48]),
            images_of(arrays.x_test[16:32], arrays.y_test[16:32]),
            epochs=2,
            seed=c.seed,
        )
        self.assertAlmostEqual(summary["reconstruction_ssim"], again["ssim"], 5)
        self.assertAlmostEqual(summary["reconstruction_mse"], again["mse"], 6)
        with open(os.path.join(run, "summary.json")) as f:
            saved = json.load(f)
        self.assertEqual(saved["reconstruction_ssim"], summary["reconstruction_ssim"])
        (events,) = glob.glob(os.path.join(run, "attacks", "events*"))
        tags = {
            value.tag: event.step
            for event in tf.compat.v1.train.summary_iterator(events)
            for value in event.summary.value
        }
        steps = summary["steps"]
        self.assertEqual(steps, 4)  # 256 examples in batches of 64
        self.assertEqual(
            tags,
            {
                "reconstructions": steps,
                "reconstruction_ssim": steps,
                "reconstruction_mse": steps,
            },
        )
        with open(os.path.join(run, "reconstructions.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class ColorectalConfigTest(base.TestCase):
    def test_config_cuts_its_model_and_turns_nopeek_on(self):
        from splitkeras import models
        from splitkeras.configs import colorectal_nopeek

        c = colorectal_nopeek.get_config()
        self.assertEqual(c.data.name, "colorectal_histology")
        self.assertGreater(c.privacy.nopeek_alpha, 0)
        model = models.build_model(
            c.model.name, input_shape=(32, 32, 3), num_classes=8, width=0.25
        )
        segments = cut(model, c.model.cut)
        self.assertEqual(len(segments.client.outputs), 1)


class LabelLeakageInExperimentTest(base.TestCase):
    def test_ushaped_runs_report_label_leakage_and_noise_blunts_it(self):
        root = self.tempdir()
        npz = _write_npz(os.path.join(root, "tiny.npz"))
        results = {}
        for name, noise in (("plain", 0.0), ("protected", 1.0)):
            c = fashion_mnist_lenet.get_config()
            c.data.path = npz
            c.train.epochs = 1
            c.train.batch_size = 64
            c.topology = "ushaped"
            c.model.cut = "pool1,fc2"
            c.privacy.gradient_noise = noise
            results[name] = experiment.train_and_evaluate(c, os.path.join(root, name))
        with open(os.path.join(root, "plain", "summary.json")) as f:
            summary = json.load(f)
        for key in ("label_leak_norm_auc", "label_leak_cosine_auc"):
            self.assertIn(key, summary)
        # Two bright/dark classes: the server's gradients separate them.
        plain = results["plain"]["label_leak_cosine_auc"]
        self.assertGreater(abs(plain - 0.5), 0.3)
        # Noise far above the gradients' scale leaves about chance.
        self.assertLess(abs(results["protected"]["label_leak_cosine_auc"] - 0.5), 0.2)
