"""Leakage of each party without the labels in a vertical split."""

import keras
import numpy as np
import tensorflow as tf

from splitkeras.configs import fashion_mnist_lenet
from splitkeras.data.sites import Site
from splitkeras.privacy.attacks.label_leakage import label_leakage
from splitkeras.privacy.distance_correlation import distance_correlation
from splitkeras.privacy.leakage import Leakage, attach_privacy
from splitkeras.schedules import vertical
from tests import base
from tests.schedules import test_vertical

EXAMPLES = 48


def _sites():
    images, ids, y = test_vertical._data()
    strips = vertical.split_image_halves(images)
    return [
        Site(
            f"client_{k}",
            x,
            y if k == 0 else None,
            x,
            y if k == 0 else None,
            ids,
            ids,
            num_classes=test_vertical.CLASSES,
        )
        for k, x in enumerate(strips)
    ]


def _config():
    c = fashion_mnist_lenet.get_config()
    c.topology = "vertical"
    c.num_clients = 2
    c.train.batch_size = test_vertical.BATCH
    c.privacy.leakage_examples = EXAMPLES
    return c


class VerticalLeakageTest(base.TestCase):
    def test_each_party_without_labels_gets_its_figures(self):
        sites = _sites()
        split = test_vertical._split()
        logs = Leakage(_config(), sites[0], strips=sites)(split)
        self.assertEqual(
            sorted(logs),
            ["label_leak_cosine_auc_1", "label_leak_norm_auc_1", "leakage_dcor_1"],
        )
        # What the server sends party 1, computed here by hand.
        xs = [tf.constant(s.x_test[:EXAMPLES]) for s in sites]
        y = sites[0].y_test[:EXAMPLES]
        cuts = [c.segment(x, training=False) for c, x in zip(split.clients, xs)]
        with tf.GradientTape() as tape:
            tape.watch(cuts)
            logits = split.server.segment(tf.concat(cuts, -1), training=False)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
                y, logits
            )
            loss = loss * EXAMPLES / test_vertical.BATCH
        grads = tape.gradient(loss, cuts)
        aucs = label_leakage(grads[1].numpy(), y == 0)
        self.assertAlmostEqual(logs["label_leak_norm_auc_1"], aucs["norm_auc"], 12)
        self.assertAlmostEqual(logs["label_leak_cosine_auc_1"], aucs["cosine_auc"], 12)
        dcor = distance_correlation(tf.reshape(xs[1], [EXAMPLES, -1]), cuts[1])
        self.assertAlmostEqual(logs["leakage_dcor_1"], float(dcor), 6)

    def test_the_servers_marvell_noise_is_measured_and_not_shifted(self):
        sites = _sites()
        plain = Leakage(_config(), sites[0], strips=sites)(test_vertical._split())
        split = test_vertical._split(marvell_strength=4.0)
        state = split.server._seeds.state.numpy()
        c = _config()
        c.privacy.marvell_strength = 4.0
        noised = Leakage(c, sites[0], strips=sites)(split)
        self.assertEqual(plain["leakage_dcor_1"], noised["leakage_dcor_1"])
        self.assertNotEqual(
            plain["label_leak_cosine_auc_1"], noised["label_leak_cosine_auc_1"]
        )
        # Measuring draws from a generator of its own, not the server's.
        np.testing.assert_array_equal(split.server._seeds.state.numpy(), state)

    def test_each_party_without_labels_reports_its_adapted_alpha(self):
        sites = _sites()
        split = test_vertical._split()
        c = _config()
        c.privacy.nopeek_alpha = 0.5
        c.privacy.nopeek_target = 0.5
        c.privacy.nopeek_adapt = 1.0
        attach_privacy(split, c)
        split.clients[1].privacy._alpha.assign(2.0)
        split.clients[0].privacy._alpha.assign(3.0)
        logs = Leakage(c, sites[0], strips=sites)(split)
        # Party 1's, not the label owner's (party 0).
        self.assertEqual(
            {k: v for k, v in logs.items() if k.startswith("nopeek_")},
            {"nopeek_adapted_alpha_1": 2.0},
        )

    def test_a_collapsed_party_is_warned(self):
        sites = _sites()
        split = test_vertical._split()
        segment = split.clients[1].segment
        segment.set_weights([np.zeros_like(w) for w in segment.get_weights()])
        leakage = Leakage(_config(), sites[0], strips=sites)
        logs = leakage(split)
        self.assertEqual(logs["leakage_dcor_1"], 0.0)
        (warning,) = leakage.summary()["privacy_warnings"]
        self.assertTrue(
            warning.startswith(
                f"party 1: the client has collapsed: its cut output is the same "
                f"for all {EXAMPLES} leakage examples"
            ),
            warning,
        )

    def test_nopeek_that_has_not_moved_a_party_is_warned(self):
        sites = _sites()
        split = test_vertical._split()
        c = _config()
        c.privacy.nopeek_alpha = 0.5
        attach_privacy(split, c)
        leakage = Leakage(c, sites[0], strips=sites)
        leakage.measure_start(split)  # untrained: the figures below are the same
        self.assertEqual(sorted(leakage.starts), [1])
        logs = leakage(split)
        self.assertEqual(leakage.starts[1], logs["leakage_dcor_1"])
        self.assertEqual(logs["leakage_dcor_change_1"], 0.0)
        summary = leakage.summary()
        self.assertEqual(summary["leakage_dcor_start_1"], leakage.starts[1])
        (warning,) = summary["privacy_warnings"]
        self.assertTrue(
            warning.startswith(
                "party 1: NoPeek is on (config.privacy.nopeek_alpha=0.5) but "
                f"leakage_dcor {logs['leakage_dcor_1']:.3f} is +0% from"
            ),
            warning,
        )
        # One party in a process of its own measures the same.
        alone = Leakage(c, sites[1], strips=[sites[1]])
        alone.party_start(split.clients[1], 1)
        self.assertEqual(
            alone.party(split.clients[1], 1),
            {k: v for k, v in logs.items() if not k.startswith("label_leak")},
        )
        self.assertEqual(alone.summary(), summary)
