"""SplitFed (SFLV1, SFLV2): exact with one client, FedAvg-weighted with many."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras import Kind
from splitkeras.checkpointing import PartyCheckpoints
from splitkeras.schedules.splitfed import SplitFed
from tests import base, tiny_models

BATCH = 8
UNEQUAL = (24, 8)  # examples of client 0 and client 1


def _shards(sizes, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, n)
    ends = np.cumsum(sizes)
    return [
        tf.data.Dataset.from_tensor_slices(
            (x[end - size : end], y[end - size : end])
        ).batch(BATCH)
        for size, end in zip(sizes, ends)
    ]


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _adam():
    return keras.optimizers.Adam(1e-2)


def _at(ushaped):
    return ("relu1", "fc1") if ushaped else "relu1"


def _splitfed(version, ushaped=False, num_clients=2, **kwargs):
    return SplitFed(
        tiny_models.bn_dropout_model,
        _at(ushaped),
        num_clients,
        _adam,
        _loss(),
        version=version,
        **kwargs,
    )


def client_weights(client) -> list:
    """All weights of a client's head and tail (BN statistics included)."""
    segments = [client.segment, client.tail]
    return [v for s in segments if s is not None for v in s.weights]


def _values(variables) -> list:
    return [np.array(v.numpy()) for v in variables]


def _by_path(sf, k=0) -> dict:
    """Client k's weights and the weights of the server (copy) it talks to."""
    server = sf.servers[k if sf.version == 1 else 0]
    variables = client_weights(sf.clients[k]) + list(server.segment.weights)
    return {v.path: v.numpy() for v in variables}


def _weighted(arrays_per_party, counts):
    total = sum(counts)
    return [
        sum(n * np.float64(a[i]) for a, n in zip(arrays_per_party, counts)) / total
        for i in range(len(arrays_per_party[0]))
    ]


def _party_state(party) -> list:
    segments = [party.segment, getattr(party, "tail", None)]
    variables = [v for s in segments if s is not None for v in s.variables]
    return _values(variables + list(party.optimizer.variables))


class SplitFedTest(base.TestCase):
    @parameterized.product(version=[1, 2], ushaped=[False, True])
    def test_one_client_equals_centralized(self, version, ushaped):
        sf = _splitfed(version, ushaped, num_clients=1)
        reference = tiny_models.bn_dropout_model()
        reference.compile(optimizer=_adam(), loss=_loss())
        for round_ in range(2):
            shard = _shards([2 * BATCH], seed=round_)
            sf.train_epoch(shard)
            # The same batches, in the same order.
            reference.fit(shard[0], shuffle=False, verbose=0)
        got = _by_path(sf)
        self.assertEqual(set(got), {v.path for v in reference.weights})
        self.assertWeightsClose(
            [got[v.path] for v in reference.weights],
            [v.numpy() for v in reference.weights],
        )

    @parameterized.product(version=[1, 2], ushaped=[False, True])
    def test_round_averages_by_example_count(self, version, ushaped):
        shards = _shards(UNEQUAL)
        # The local half of the round alone gives each party's own result.
        local = _splitfed(version, ushaped, run_eagerly=True)
        self.assertEqual(local.train_clients(shards), list(UNEQUAL))
        clients = [_values(client_weights(c)) for c in local.clients]
        servers = [_values(s.segment.weights) for s in local.servers]
        self.assertGreater(np.abs(clients[0][0] - clients[1][0]).max(), 1e-4)

        sf = _splitfed(version, ushaped, run_eagerly=True)
        sf.train_epoch(shards)
        expected = _weighted(clients, UNEQUAL)
        plain_mean = _weighted(clients, (1, 1))
        for client in sf.clients:
            self.assertWeightsClose(_values(client_weights(client)), expected, 1e-6)
        if ushaped:  # dropout seed states are not weights: each client keeps its own
            seeds = [c.tail.get_layer("drop2").seed_generator.state for c in sf.clients]
            self.assertFalse(np.array_equal(seeds[0].numpy(), seeds[1].numpy()))
        # The weighting counts examples: the plain mean is another model.
        self.assertGreater(np.abs(expected[0] - plain_mean[0]).max(), 1e-4)
        if version == 1:
            self.assertGreater(np.abs(servers[0][0] - servers[1][0]).max(), 1e-4)
            expected_server = _weighted(servers, UNEQUAL)
            for server in sf.servers:
                self.assertWeightsClose(
                    _values(server.segment.weights), expected_server, 1e-6
                )
        else:  # SFLV2's one server is trained, never averaged.
            self.assertLen(sf.servers, 1)
            self.assertWeightsClose(_values(sf.servers[0].segment.weights), servers[0])

    @parameterized.parameters(1, 2)
    def test_clients_share_only_the_server(self, version):
        shards = _shards(UNEQUAL)
        both = _splitfed(version, run_eagerly=True)
        both.train_clients(shards)
        alone = _splitfed(version, run_eagerly=True)
        alone.train_clients([shards[0].take(0), shards[1]])
        same = [
            np.array_equal(a, b)
            for a, b in zip(
                _values(client_weights(both.clients[1])),
                _values(client_weights(alone.clients[1])),
            )
        ]
        if version == 1:  # own server copy: client 0 changes nothing for client 1
            self.assertTrue(all(same))
        else:  # one server, which client 0 trained first
            self.assertFalse(all(same))

    @parameterized.parameters(1, 2)
    def test_ushaped_server_never_sees_labels(self, version):
        sf = _splitfed(version, ushaped=True, run_eagerly=True)
        received, routed = [], []
        handle = sf.server.handle
        sf.server.handle = lambda m: received.append(m) or handle(m)
        for k, server in enumerate(sf.servers if version == 1 else []):
            copy_handle = server.handle
            server.handle = lambda m, k=k, h=copy_handle: (
                routed.append((k, m.client_id)) or h(m)
            )
        sf.train_epoch(_shards(UNEQUAL))
        self.assertEqual(
            {m.kind for m in received}, {Kind.TRAIN, Kind.OUTPUT_GRADIENTS}
        )
        self.assertEqual({m.client_id for m in received}, {0, 1})
        self.assertTrue(all(m.labels is None for m in received))
        if version == 1:  # client k talks to copy k only
            self.assertEqual({k for k, _ in routed}, {0, 1})
            self.assertTrue(all(k == client for k, client in routed))

    def test_byte_counts_are_exact(self):
        sf = _splitfed(version=1)
        for _ in range(2):
            sf.train_epoch(_shards(UNEQUAL))
        counts = sf.byte_counts()
        # Up per example: relu1's 8x8x4 float32 activations and an int64 label.
        # Down: their float32 gradients, and the float32 loss once per batch.
        activations = 8 * 8 * 4 * 4
        batches = [n // BATCH for n in UNEQUAL]
        self.assertEqual(
            counts["bytes_up"], [2 * n * (activations + 8) for n in UNEQUAL]
        )
        self.assertEqual(
            counts["bytes_down"],
            [2 * (n * activations + 4 * b) for n, b in zip(UNEQUAL, batches)],
        )
        # Weights up, average down, once per round: conv1's 3x3x1x4 kernel and
        # bn1's gamma, beta, moving mean and variance, as float32.
        weights = 4 * (3 * 3 * 1 * 4 + 4 * 4)
        self.assertEqual(counts["aggregation_bytes_sent"], [2 * weights] * 2)
        self.assertEqual(counts["aggregation_bytes_received"], [2 * weights] * 2)

    @parameterized.parameters((1, True), (2, False))
    def test_checkpoint_round_trip(self, version, ushaped):
        root = self.tempdir()
        sf = _splitfed(version, ushaped, run_eagerly=True)
        sf.train_epoch(_shards(UNEQUAL))
        epoch = tf.Variable(1, dtype=tf.int64)
        saved = sf.checkpoints(epoch=epoch)
        self.assertEqual(set(saved), {"client_0", "client_1", "server"})
        PartyCheckpoints(root, saved).save(1)

        keras.backend.clear_session()  # names repeat, as in a fresh process
        restored = _splitfed(version, ushaped, run_eagerly=True)
        epoch_back = tf.Variable(0, dtype=tf.int64)
        checkpoints = PartyCheckpoints(root, restored.checkpoints(epoch=epoch_back))
        self.assertEqual(checkpoints.restore_latest(), 1)
        restored.resumed(int(epoch_back.numpy()))
        self.assertEqual(int(epoch_back.numpy()), 1)
        self.assertEqual(restored.byte_counts(), sf.byte_counts())
        for a, b in zip(
            [*sf.clients, *sf.servers], [*restored.clients, *restored.servers]
        ):
            self.assertWeightsClose(_party_state(b), _party_state(a), atol=0)
        # The next round continues exactly.
        sf.train_epoch(_shards(UNEQUAL, seed=1))
        restored.train_epoch(_shards(UNEQUAL, seed=1))
        self.assertWeightsClose(
            list(_by_path(restored).values()), list(_by_path(sf).values()), atol=0
        )

    def test_evaluate_uses_the_averaged_model(self):
        # skip_model has no regularizer: Keras's evaluate loss would add it.
        sf = SplitFed(tiny_models.skip_model, "relu_a", 2, _adam, _loss())
        shards = _shards(UNEQUAL)
        sf.train_epoch(shards)
        reference = tiny_models.skip_model()
        averaged = _by_path(sf)
        reference.set_weights([averaged[v.path] for v in reference.weights])
        reference.compile(loss=_loss(), metrics=["accuracy"])
        expected = reference.evaluate(shards[0], verbose=0, return_dict=True)
        got = sf.evaluate(shards[0])
        self.assertAlmostEqual(got["loss"], expected["loss"], places=5)
        self.assertAlmostEqual(got["accuracy"], expected["accuracy"], places=6)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, r"unknown SplitFed version 3; choose"):
            _splitfed(version=3)
        with self.assertRaisesRegex(ValueError, r"num_clients must be >= 1, got 0"):
            _splitfed(version=1, num_clients=0)
        seeds = iter(range(10))
        with self.assertRaisesRegex(
            ValueError, r"client copy 1 other initial weights .* seed it inside"
        ):
            SplitFed(
                lambda: tiny_models.skip_model(seed=next(seeds)),
                "relu_a",
                2,
                _adam,
                _loss(),
            )
        sf = _splitfed(version=2, run_eagerly=True)
        with self.assertRaisesRegex(ValueError, r"got 1 client datasets for 2"):
            sf.train_epoch(_shards([BATCH]))
        empty = [d.take(0) for d in _shards(UNEQUAL)]
        with self.assertRaisesRegex(ValueError, r"no client has any example"):
            sf.train_epoch(empty)
