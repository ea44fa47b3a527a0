"""Micro-batched and asynchronous steps of the round robin, in one process
(config.train.microbatches, config.train.max_staleness)."""

import os

import numpy as np
import tensorflow as tf

from splitkeras import builders
from splitkeras.experiment import InProcess
from splitkeras.parties.microbatches import pieces
from splitkeras.schedules import pipelining
from splitkeras.transport.turns import yield_all
from tests import base
from tests.distributed.runs import (
    in_process,
    in_process_weights,
    setup,
    write_npz,
)

# SGD: Adam's first steps move a weight by about its learning rate whatever
# the size of its gradient, so rounding differences between the two sums of
# the same gradient would be amplified into the comparison.
SGD = {"train.optimizer": "sgd", "train.learning_rate": 0.05}


def _max_difference(a, b) -> float:
    return max(
        float(np.abs(x - y).max()) for name in a for x, y in zip(a[name], b[name])
    )


class PiecesTest(base.TestCase):
    def test_pieces_cover_the_batch_and_only_leading_ones_are_empty(self):
        self.assertEqual(pieces(10, 4), [(0, 2), (2, 5), (5, 7), (7, 10)])
        self.assertEqual(pieces(2, 4), [(0, 0), (0, 1), (1, 1), (1, 2)])
        for rows in range(1, 12):
            bounds = pieces(rows, 4)
            self.assertEqual(bounds[0][0], 0)
            self.assertEqual(bounds[-1][1], rows)
            self.assertGreater(bounds[-1][1], bounds[-1][0])  # the last is sent
            for (_, end), (first, _) in zip(bounds, bounds[1:]):
                self.assertEqual(end, first)


class PipeliningTest(base.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # 70 examples: 35 per client, in batches of 32 and 3 (the last one
        # smaller than M = 4: its leading micro-batch is empty).
        cls.npz = write_npz(os.path.join(base.TestCase().tempdir(), "s.npz"), 70)

    def _run(self, **overrides):
        config, _ = setup(self.npz, **SGD, **overrides)
        schedule = in_process(config)
        return schedule, in_process_weights(config, schedule)

    def _one_batch(self):
        """The unpipelined run's weights (computed once for the class)."""
        cls = type(self)
        if not hasattr(cls, "one"):
            cls.one = self._run()[1]
        return cls.one

    def test_microbatches_make_the_unpipelined_update(self):
        # M = 4: batches of 32 in pieces of 8, and the last batch of each
        # turn (3 rows) with its first piece empty (not sent).
        schedule, pipelined = self._run(**{"train.microbatches": 4})
        self.assertLess(_max_difference(self._one_batch(), pipelined), 1e-5)
        steps = 2 * 2 * 2  # 2 epochs x 2 clients x 2 batches: one update each
        self.assertEqual(int(schedule.server.optimizer.iterations.numpy()), steps)
        self.assertEqual(int(schedule.coordinator.step.numpy()), steps)
        for sums in schedule.server.gradient_sums().sums:  # nothing left over
            self.assertEqual(float(tf.reduce_max(tf.abs(sums))), 0.0)

    def test_staleness_changes_nothing_when_the_client_weights_stay(self):
        # With the clients' learning rate 0 their forward pass is the same
        # whenever it runs: the server sees the same activations in the same
        # order, so the run equals the synchronous one.
        config, _ = setup(self.npz, **SGD)
        still = self._frozen_clients(config)
        config, _ = setup(self.npz, **SGD, **{"train.max_staleness": 2})
        stale = self._frozen_clients(config)
        self.assertEqual(_max_difference(still, stale), 0.0)

    def _frozen_clients(self, config):
        data = builders.load_data(config)
        schedule = builders.build_schedule(config, data)
        for client in schedule.clients:
            client.optimizer.learning_rate = 0.0
        process = InProcess(config, schedule, data)
        for epoch in range(config.train.epochs):
            yield_all(process.round(epoch))
        return {"server": [w.numpy() for w in schedule.server.segment.weights]}

    def test_stale_steps_apply_every_batch(self):
        schedule, stale = self._run(**{"train.max_staleness": 2})
        # The optimizer's state is handed on with the weights: client 0 ends
        # after 6 of the 8 batches (2 per turn), client 1 after all 8.
        iterations = [int(c.optimizer.iterations.numpy()) for c in schedule.clients]
        self.assertEqual(iterations, [6, 8])
        self.assertEqual(int(schedule.server.optimizer.iterations.numpy()), 8)
        self.assertFalse(schedule.resumable_mid_round)
        self.assertGreater(_max_difference(self._one_batch(), stale), 1e-4)


class PipeliningConfigTest(base.TestCase):
    def test_defaults_are_synchronous(self):
        config, _ = setup("unused.npz")
        self.assertEqual(pipelining(config), (1, 0))

    def test_out_of_range(self):
        config, _ = setup("unused.npz", **{"train.microbatches": 0})
        with self.assertRaisesRegex(ValueError, "microbatches must be >= 1"):
            pipelining(config)

    def test_only_the_vanilla_round_robin(self):
        for overrides, named in (
            ({"method": "splitfed_v1"}, "method='splitfed_v1'"),
            ({"topology": "ushaped", "model.cut": "pool1,fc2"}, "topology='ushaped'"),
        ):
            config, _ = setup("unused.npz", **{"train.max_staleness": 1}, **overrides)
            with self.subTest(named), self.assertRaisesRegex(ValueError, named):
                pipelining(config)

    def test_no_microbatches_with_loss_scaling(self):
        config, _ = setup(
            "unused.npz",
            **{"train.microbatches": 2, "train.mixed_precision": "mixed_float16"},
        )
        with self.assertRaisesRegex(ValueError, "loss scaling"):
            pipelining(config)
