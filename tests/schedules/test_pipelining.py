"""Micro-batched and asynchronous steps of the round robin, in one process
(config.train.microbatches, config.train.max_staleness)."""

import collections
import os

import keras
import numpy as np
import tensorflow as tf

from splitkeras.objective import Objective
from splitkeras.parties.microbatches import pieces
from splitkeras.parties.server import Server
from splitkeras.protocol import Kind, Message
from splitkeras.schedules import RoundRobin, pipelining
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

    def test_stale_steps_apply_every_batch(self):
        schedule, stale = self._run(**{"train.max_staleness": 2})
        # The optimizer's state is handed on with the weights: client 0 ends
        # after 6 of the 8 batches (2 per turn), client 1 after all 8.
        iterations = [int(c.optimizer.iterations.numpy()) for c in schedule.clients]
        self.assertEqual(iterations, [6, 8])
        self.assertEqual(int(schedule.server.optimizer.iterations.numpy()), 8)
        self.assertFalse(schedule.resumable_mid_round)
        self.assertGreater(_max_difference(self._one_batch(), stale), 1e-4)


def _tiny():
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, activation="tanh", name="client")(x)
    return keras.Model(x, keras.layers.Dense(2, name="server")(h))


def _tiny_server():
    x = keras.Input((3,))
    return keras.Model(x, keras.layers.Dense(2)(x))


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RATE = 0.5


def _stale_by_hand(batches, staleness):
    """The asynchronous schedule written out with plain tapes: the server
    applies each batch as it comes; the client applies a batch's cut
    gradient `staleness` batches later, to its weights as they are then,
    through the batch's forward pass computed again."""
    model = _tiny()
    client, server = model.get_layer("client"), model.get_layer("server")

    def apply_client(x, cut_gradient):
        with tf.GradientTape() as tape:
            cut = client(x)
        grads = tape.gradient(cut, client.trainable_variables, cut_gradient)
        for v, g in zip(client.trainable_variables, grads):
            v.assign_sub(RATE * g)

    waiting = collections.deque()
    for x, y in batches:
        cut = client(x)
        with tf.GradientTape() as tape:
            tape.watch(cut)
            loss = LOSS(y, server(cut))
        cut_gradient, *grads = tape.gradient(loss, [cut, *server.trainable_variables])
        for v, g in zip(server.trainable_variables, grads):
            v.assign_sub(RATE * g)
        waiting.append((x, cut_gradient))
        if len(waiting) > staleness:
            apply_client(*waiting.popleft())
    while waiting:
        apply_client(*waiting.popleft())
    return [w.numpy() for w in model.weights]


class StalenessByHandTest(base.TestCase):
    def test_round_robin_equals_the_schedule_written_out(self):
        rng = np.random.default_rng(0)
        batches = [
            (
                tf.constant(rng.normal(size=(5, 4)), tf.float32),
                tf.constant(rng.integers(0, 2, 5), tf.int64),
            )
            for _ in range(6)
        ]
        dataset = tf.data.Dataset.from_generator(
            lambda: iter(batches),
            output_signature=(
                tf.TensorSpec([None, 4], tf.float32),
                tf.TensorSpec([None], tf.int64),
            ),
        )
        results = {}
        for staleness in (0, 1, 3):
            schedule = RoundRobin(
                _tiny,
                "client",
                1,
                lambda: keras.optimizers.SGD(RATE),
                LOSS,
                max_staleness=staleness,
            )
            schedule.take_turn(0, dataset)
            ours = schedule.clients[0].segment.weights
            ours = [w.numpy() for w in ours + schedule.server.segment.weights]
            expected = _stale_by_hand(batches, staleness)
            for a, b in zip(ours, expected):
                np.testing.assert_allclose(a, b, atol=1e-6)
            results[staleness] = ours
        for staleness in (1, 3):  # not the synchronous run
            self.assertGreater(
                max(
                    np.abs(a - b).max() for a, b in zip(results[0], results[staleness])
                ),
                1e-3,
            )


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

    def test_no_microbatches_on_a_distributed_server(self):
        config, _ = setup(
            "unused.npz",
            **{"train.microbatches": 2, "server.strategy": "mirrored"},
        )
        with self.assertRaisesRegex(ValueError, "distributed server"):
            pipelining(config)

    def test_only_the_batch_mean_loss_is_shared_by_rows(self):
        server = Server(
            _tiny_server(),
            keras.optimizers.SGD(RATE),
            Objective(keras.losses.SparseCategoricalCrossentropy(reduction="sum")),
        )
        piece = Message(
            Kind.TRAIN,
            0,
            1,
            (tf.ones([2, 3]),),
            tf.constant([0, 1], tf.int64),
            offset=0,
            rows=4,
        )
        with self.assertRaisesRegex(ValueError, "loss reduction 'sum'"):
            server.handle(piece)

    def test_no_microbatches_with_loss_scaling(self):
        config, _ = setup(
            "unused.npz",
            **{"train.microbatches": 2, "train.mixed_precision": "mixed_float16"},
        )
        with self.assertRaisesRegex(ValueError, "loss scaling"):
            pipelining(config)
