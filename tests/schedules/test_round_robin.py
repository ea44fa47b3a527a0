"""Round-robin split learning over K clients equals centralized training."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras import Kind
from splitkeras.parties.handoff import HandoffError, pack_state
from splitkeras.schedules.round_robin import RoundRobin
from tests import base, tiny_models

K, BATCH, PER_CLIENT = 3, 8, 2  # batches per client per epoch


def _epoch_shards(epoch):
    rng = np.random.default_rng(epoch)
    n = K * PER_CLIENT * BATCH
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, n)
    size = PER_CLIENT * BATCH
    return [
        tf.data.Dataset.from_tensor_slices(
            (x[k * size : (k + 1) * size], y[k * size : (k + 1) * size])
        ).batch(BATCH)
        for k in range(K)
    ]


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _adam():
    return keras.optimizers.Adam(1e-2)


def _newest_weights(rr):
    client = rr.clients[rr.active]
    segments = [client.segment, rr.server.segment, client.tail]
    return {v.path: v.numpy() for s in segments if s is not None for v in s.weights}


class RoundRobinTest(base.TestCase):
    @parameterized.product(handoff=["peer", "server"], ushaped=[False, True])
    def test_equals_centralized_on_the_same_batches(self, handoff, ushaped):
        at = ("relu1", "fc1") if ushaped else "relu1"
        rr = RoundRobin(
            tiny_models.bn_dropout_model, at, K, _adam, _loss(), handoff=handoff
        )
        reference = tiny_models.bn_dropout_model()
        reference.compile(optimizer=_adam(), loss=_loss())
        for epoch in range(2):
            shards = _epoch_shards(epoch)
            rr.train_epoch(shards)
            for shard in shards:  # the same batches, in the same order
                reference.fit(shard, verbose=0)
        newest = _newest_weights(rr)
        self.assertWeightsClose(
            [newest[v.path] for v in reference.weights],
            [v.numpy() for v in reference.weights],
        )
        self.assertEqual(rr.active, K - 1)

    def test_clients_really_receive_each_others_weights(self):
        rr = RoundRobin(tiny_models.bn_dropout_model, "relu1", K, _adam, _loss())
        before = [c.segment.get_weights()[0].copy() for c in rr.clients]
        rr.take_turn(0, _epoch_shards(0)[0])
        after_0 = rr.clients[0].segment.get_weights()[0]
        self.assertGreater(np.abs(after_0 - before[0]).max(), 1e-4)
        # Client 1 has not trained, yet still holds the initial weights...
        np.testing.assert_array_equal(rr.clients[1].segment.get_weights()[0], before[1])
        rr.take_turn(1, _epoch_shards(0)[1].take(0))  # ...until its turn starts
        np.testing.assert_array_equal(rr.clients[1].segment.get_weights()[0], after_0)

    def test_server_relay_holds_only_ciphertext_and_detects_tampering(self):
        rr = RoundRobin(
            tiny_models.bn_dropout_model, "relu1", K, _adam, _loss(), handoff="server"
        )
        rr.take_turn(0, _epoch_shards(0)[0])
        stored = rr.coordinator.state.numpy()  # what the server keeps for client 1
        kernel = rr.clients[0].segment.get_weights()[0].tobytes()
        self.assertNotIn(kernel[:64], stored)
        self.assertNotIn(pack_state(rr.clients[0])[:200], stored)
        tampered = bytearray(stored)
        tampered[-1] ^= 1
        rr.coordinator.state.assign(bytes(tampered))
        with self.assertRaisesRegex(
            HandoffError, r"weights for client 1 .* failed authentication"
        ):
            rr.take_turn(1, _epoch_shards(0)[1])

    def test_handoff_bytes_are_counted_apart_from_activations(self):
        rr = RoundRobin(tiny_models.bn_dropout_model, "relu1", K, _adam, _loss())
        rr.train_epoch(_epoch_shards(0))
        counts = rr.byte_counts()
        state = len(pack_state(rr.clients[0]))
        sealed = state + 28 + len(b"client 0 -> client 1, round 0") + 2
        # Every client hands on at the end of its turn (the last to client 0,
        # for the next round); each takes what it receives when its turn begins.
        self.assertEqual(counts["handoff_bytes_sent"], [sealed] * K)
        self.assertEqual(counts["handoff_bytes_received"], [0, sealed, sealed])
        per_client_up = PER_CLIENT * BATCH * (8 * 8 * 4 * 4 + 8)
        self.assertEqual(counts["bytes_up"], [per_client_up] * K)

    def test_ushaped_server_never_sees_labels(self):
        rr = RoundRobin(
            tiny_models.bn_dropout_model,
            ("relu1", "fc1"),
            K,
            _adam,
            _loss(),
            run_eagerly=True,
        )
        received = []
        handle = rr.server.handle
        rr.server.handle = lambda m: received.append(m) or handle(m)
        rr.train_epoch(_epoch_shards(0))
        self.assertEqual(
            {m.kind for m in received}, {Kind.TRAIN, Kind.OUTPUT_GRADIENTS}
        )
        self.assertEqual({m.client_id for m in received}, set(range(K)))
        self.assertTrue(all(m.labels is None for m in received))

    def test_evaluate_uses_the_newest_client_state(self):
        # skip_model has no regularizer: Keras's evaluate loss would add it.
        rr = RoundRobin(tiny_models.skip_model, "relu_a", K, _adam, _loss())
        shards = _epoch_shards(0)
        rr.train_epoch(shards)
        reference = tiny_models.skip_model()
        newest = _newest_weights(rr)
        reference.set_weights([newest[v.path] for v in reference.weights])
        reference.compile(loss=_loss(), metrics=["accuracy"])
        expected = reference.evaluate(shards[0], verbose=0, return_dict=True)
        got = rr.evaluate(shards[0])
        self.assertAlmostEqual(got["loss"], expected["loss"], places=5)
        self.assertAlmostEqual(got["accuracy"], expected["accuracy"], places=6)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, r"unknown weight handoff 'smoke'"):
            RoundRobin(
                tiny_models.skip_model, "relu_a", 2, _adam, _loss(), handoff="smoke"
            )
        rr = RoundRobin(tiny_models.skip_model, "relu_a", 2, _adam, _loss())
        with self.assertRaisesRegex(ValueError, r"got 3 client datasets for 2 clients"):
            rr.train_epoch(_epoch_shards(0))
