"""Multi-hop split learning (client -> relay -> server) equals uncut training."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.protocol import DATA_KINDS, Kind, Message, Rejected
from splitkeras.schedules.multihop import MultiHop, hop_segments
from tests import base, tiny_models

STEPS = 12
BATCH = 8

OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
}
MODELS = {
    "bn_dropout": (tiny_models.bn_dropout_model, ("relu1", "fc1")),
    "skip": (tiny_models.skip_model, ("relu_a", "fc1")),
}


def _dataset(steps=STEPS):
    rng = np.random.default_rng(0)
    x = rng.random((steps * BATCH, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, steps * BATCH)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit_reference(build, make_opt, ds):
    reference = build()
    reference.compile(optimizer=make_opt(), loss=_loss())
    reference.fit(ds, epochs=1, verbose=0, shuffle=False)
    return reference


def _record(party):
    """Replaces `party.handle` by one that records the messages it gets."""
    received = []
    handle = party.handle
    party.handle = lambda m: received.append(m) or handle(m)
    return received


class MultiHopParityTest(base.TestCase):
    @parameterized.product(model=list(MODELS), optimizer=list(OPTIMIZERS))
    def test_equals_uncut_fit_on_the_same_batches(self, model, optimizer):
        build, at = MODELS[model]
        make_opt = OPTIMIZERS[optimizer]
        _, _, ds = _dataset()
        reference = _fit_reference(build, make_opt, ds)

        uncut = build()
        initial = [w.copy() for w in uncut.get_weights()]
        multihop = MultiHop(uncut, at, make_opt, _loss())
        multihop.train_epoch(ds)

        moved = max(abs(a - b).max() for a, b in zip(initial, uncut.get_weights()))
        self.assertGreater(moved, 1e-3)
        self.assertWeightsClose(reference.get_weights(), uncut.get_weights())
        self.assertEqual(list(multihop.parties), ["client_0", "relay", "server"])
        for name, party in multihop.parties.items():
            self.assertEqual(int(party.optimizer.iterations), STEPS, name)

    def test_chain_of_two_relays_equals_uncut_fit(self):
        _, _, ds = _dataset()
        make_opt = OPTIMIZERS["adam"]
        reference = _fit_reference(tiny_models.bn_dropout_model, make_opt, ds)
        uncut = tiny_models.bn_dropout_model()
        multihop = MultiHop(uncut, ("relu1", "relu2", "fc1"), make_opt, _loss())
        multihop.train_epoch(ds)
        self.assertWeightsClose(reference.get_weights(), uncut.get_weights())
        self.assertEqual(
            list(multihop.parties), ["client_0", "relay_0", "relay_1", "server"]
        )
        self.assertEqual(
            [[layer.name for layer in r.segment.layers[1:]] for r in multihop.relays],
            [["conv2", "bn2", "relu2"], ["flatten", "drop", "fc1"]],
        )
        for party in multihop.parties.values():
            self.assertEqual(int(party.optimizer.iterations), STEPS)

    def test_run_eagerly_equals_compiled(self):
        _, _, ds = _dataset(steps=3)
        weights = []
        for eager in (False, True):
            keras.backend.clear_session()
            uncut = tiny_models.skip_model()
            MultiHop(
                uncut, ("relu_a", "fc1"), OPTIMIZERS["adam"], _loss(), run_eagerly=eager
            ).train_epoch(ds)
            weights.append(uncut.get_weights())
        self.assertWeightsClose(weights[0], weights[1], atol=1e-6)

    def test_evaluate_and_predict_match_uncut_model(self):
        # skip_model has no regularizer: Keras's evaluate loss would add it.
        x, _, ds = _dataset(steps=4)
        uncut = tiny_models.skip_model()
        multihop = MultiHop(uncut, ("relu_a", "fc1"), "adam", _loss())
        multihop.train_epoch(ds.take(2))
        np.testing.assert_allclose(
            multihop.predict(x, batch_size=BATCH).numpy(),
            uncut.predict(x, batch_size=BATCH, verbose=0),
            atol=1e-6,
        )
        uncut.compile(loss=_loss(), metrics=["accuracy"])
        theirs = uncut.evaluate(ds, verbose=0, return_dict=True)
        ours = multihop.evaluate(ds)
        self.assertAlmostEqual(ours["loss"], theirs["loss"], places=5)
        self.assertAlmostEqual(ours["accuracy"], theirs["accuracy"], places=6)


class MultiHopProtocolTest(base.TestCase):
    @parameterized.parameters(("float32", 4), ("bfloat16", 2), ("float16", 2))
    def test_bytes_counted_per_hop(self, codec, wire_size):
        _, _, ds = _dataset(steps=3)
        multihop = MultiHop(
            tiny_models.bn_dropout_model(),
            ("relu1", "fc1"),
            "sgd",
            _loss(),
            codec=codec,
        )
        multihop.train_epoch(ds)
        multihop.evaluate(ds.take(1))
        first_cut = BATCH * 8 * 8 * 4  # relu1's output
        second_cut = BATCH * 16  # fc1's output
        labels = BATCH * 8  # int64 labels travel up every hop (vanilla)
        self.assertEqual(
            multihop.byte_counts(),
            {
                # 3 TRAIN + 1 EVALUATE up; 3 GRADIENTS (+ float32 loss) and
                # 1 ACK (the loss alone) down.
                "hop_0/bytes_up": [4 * (first_cut * wire_size + labels)],
                "hop_0/bytes_down": [3 * (first_cut * wire_size + 4) + 4],
                "hop_1/bytes_up": [4 * (second_cut * wire_size + labels)],
                "hop_1/bytes_down": [3 * (second_cut * wire_size + 4) + 4],
            },
        )

    @parameterized.parameters(
        ("bn_dropout", [(BATCH, 8, 8, 4)], [(BATCH, 16)]),
        # The skip connection crosses the first cut: two tensors on hop 0.
        ("skip", [(BATCH, 8, 8, 4), (BATCH, 8, 8, 4)], [(BATCH, 8)]),
    )
    def test_server_receives_only_what_the_relay_sends(self, model, hop0, hop1):
        build, at = MODELS[model]
        x, y, ds = _dataset(steps=2)
        multihop = MultiHop(build(), at, "sgd", _loss(), run_eagerly=True)
        at_relay = _record(multihop.relays[0])
        at_server = _record(multihop.server)
        sent = []
        request = multihop.hops[1].request
        multihop.hops[1].request = lambda m: sent.append(m) or request(m)
        multihop.train_epoch(ds)
        multihop.predict(x[:BATCH])

        # The round's BEGIN and END pass the relay on their way to the server's
        # coordinator; the steps reach the server as the relay sent them.
        self.assertEqual(
            [m.kind for m in at_relay if m.kind not in DATA_KINDS],
            [Kind.BEGIN, Kind.END],
        )
        at_relay = [m for m in at_relay if m.kind in DATA_KINDS]
        sent = [m for m in sent if m.kind in DATA_KINDS]
        kinds = [Kind.TRAIN, Kind.TRAIN, Kind.PREDICT]
        self.assertEqual([m.kind for m in at_relay], kinds)
        self.assertEqual([m.kind for m in at_server], kinds)
        for m in at_relay:
            self.assertEqual([tuple(t.shape) for t in m.tensors], hop0)
        for i, (out, got) in enumerate(zip(sent, at_server)):
            self.assertEqual([tuple(t.shape) for t in got.tensors], hop1)
            for a, b in zip(out.tensors, got.tensors):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
            if got.kind == Kind.TRAIN:
                # Vanilla multi-hop: the labels pass through the relay.
                np.testing.assert_array_equal(
                    got.labels, y[i * BATCH : (i + 1) * BATCH]
                )
                np.testing.assert_array_equal(at_relay[i].labels, got.labels)
            else:
                self.assertIsNone(got.labels)

    def test_relay_refuses_messages_it_does_not_forward(self):
        multihop = MultiHop(tiny_models.skip_model(), ("relu_a", "fc1"), "sgd", _loss())
        message = Message(Kind.OUTPUT_GRADIENTS, client_id=0, step=1)
        with self.assertRaisesRegex(
            Rejected, r"relay cannot handle a OUTPUT_GRADIENTS message"
        ):
            multihop.relays[0].handle(message)

    def test_one_cut_layer_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"at least two cut layers.*'relu1'"):
            hop_segments(tiny_models.bn_dropout_model(), "relu1")


class MultiHopCheckpointTest(base.TestCase):
    def test_each_party_saves_its_own_state_and_restores_it(self):
        _, _, ds = _dataset(steps=4)
        multihop = MultiHop(
            tiny_models.bn_dropout_model(), ("relu1", "fc1"), "adam", _loss()
        )
        multihop.train_epoch(ds.take(2))
        root = self.tempdir()
        checkpoints = multihop.checkpoints()
        paths = {p: c.save(f"{root}/{p}/ckpt") for p, c in checkpoints.items()}
        saved = {
            p: {
                k.split("/")[1]
                for k in tf.train.load_checkpoint(path).get_variable_to_shape_map()
                if k.startswith("variables/")
            }
            for p, path in paths.items()
        }
        self.assertIn("conv1..kernel", saved["client_0"])
        self.assertIn("conv2..kernel", saved["relay"])
        self.assertIn("logits..kernel", saved["server"])
        self.assertFalse(saved["client_0"] & saved["relay"])
        self.assertFalse(saved["relay"] & saved["server"])
        before = [w.copy() for w in multihop.client.segment.get_weights()]
        counts = multihop.byte_counts()

        multihop.train_epoch(ds.skip(2))
        for party, checkpoint in multihop.checkpoints().items():
            checkpoint.restore(paths[party]).assert_existing_objects_matched()
        self.assertWeightsClose(before, multihop.client.segment.get_weights(), atol=0)
        self.assertEqual(multihop.byte_counts(), counts)
        for party in multihop.parties.values():
            self.assertEqual(int(party.optimizer.iterations), 2)
