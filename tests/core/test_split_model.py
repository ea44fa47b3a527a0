"""SplitModel trains exactly like the uncut model (the seed's parity claim)."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import splitkeras
from tests import base, tiny_models

STEPS = 20
BATCH = 8

OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
}
MODELS = {
    # (builder, vanilla cut, U-shaped cuts)
    "bn_dropout": (tiny_models.bn_dropout_model, "relu1", ["relu1", "fc1"]),
    "skip": (tiny_models.skip_model, "relu_a", ["relu_a", "fc1"]),
}


def _dataset():
    rng = np.random.default_rng(0)
    x = rng.random((STEPS * BATCH, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, STEPS * BATCH)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class ParityTest(base.TestCase):
    @parameterized.product(
        model=list(MODELS), optimizer=list(OPTIMIZERS), ushaped=[False, True]
    )
    def test_split_training_equals_uncut_training(self, model, optimizer, ushaped):
        build, vanilla_cut, u_cut = MODELS[model]
        make_opt = OPTIMIZERS[optimizer]
        _, _, ds = _dataset()

        reference = build()
        reference.compile(optimizer=make_opt(), loss=_loss(), metrics=["accuracy"])
        ref_hist = reference.fit(ds, epochs=1, verbose=0)

        uncut = build()
        base_weights = [w.copy() for w in uncut.get_weights()]
        split = splitkeras.SplitModel(uncut, u_cut if ushaped else vanilla_cut)
        split.compile(make_opt(), make_opt(), loss=_loss(), metrics=["accuracy"])
        hist = split.fit(ds, epochs=1, verbose=0)

        self.assertEqual(int(split.client_optimizer.iterations), STEPS)
        self.assertEqual(int(split.server_optimizer.iterations), STEPS)
        # Training moved the weights, and exactly as the uncut model's.
        self.assertGreater(
            max(abs(a - b).max() for a, b in zip(base_weights, uncut.get_weights())),
            1e-3,
        )
        self.assertWeightsClose(reference.get_weights(), uncut.get_weights())
        self.assertAlmostEqual(
            ref_hist.history["loss"][0], hist.history["loss"][0], places=5
        )

    def test_batchnorm_statistics_updated_once_per_step(self):
        _, _, ds = _dataset()
        reference = tiny_models.bn_dropout_model()
        reference.compile(optimizer="sgd", loss=_loss())
        reference.fit(ds.take(1), verbose=0)
        uncut = tiny_models.bn_dropout_model()
        split = splitkeras.SplitModel(uncut, "relu1")
        split.compile("sgd", "sgd", loss=_loss())
        split.fit(ds.take(1), verbose=0)
        for name in ("bn1", "bn2"):
            np.testing.assert_allclose(
                uncut.get_layer(name).moving_mean.numpy(),
                reference.get_layer(name).moving_mean.numpy(),
                atol=1e-7,
            )

    def test_run_eagerly_equals_compiled(self):
        _, _, ds = _dataset()
        weights = []
        for eager in (False, True):
            keras.backend.clear_session()
            uncut = tiny_models.skip_model()
            split = splitkeras.SplitModel(uncut, ["relu_a", "fc1"])
            split.compile(
                keras.optimizers.Adam(1e-2),
                keras.optimizers.Adam(1e-2),
                loss=_loss(),
                run_eagerly=eager,
            )
            split.fit(ds.take(3), verbose=0)
            weights.append(uncut.get_weights())
        self.assertWeightsClose(weights[0], weights[1], atol=1e-6)

    def test_evaluate_and_predict_match_uncut_model(self):
        x, y, ds = _dataset()
        uncut = tiny_models.skip_model()
        split = splitkeras.SplitModel(uncut, ["relu_a", "fc1"])
        split.compile("adam", "adam", loss=_loss(), metrics=["accuracy"])
        split.fit(ds.take(2), verbose=0)
        np.testing.assert_allclose(
            split.predict(x, batch_size=BATCH, verbose=0),
            uncut.predict(x, batch_size=BATCH, verbose=0),
            atol=1e-6,
        )
        uncut.compile(loss=_loss(), metrics=["accuracy"])
        ours = split.evaluate(ds, verbose=0, return_dict=True)
        theirs = uncut.evaluate(ds, verbose=0, return_dict=True)
        self.assertAlmostEqual(ours["loss"], theirs["loss"], places=5)
        self.assertAlmostEqual(ours["accuracy"], theirs["accuracy"], places=6)


class ProtocolTest(base.TestCase):
    def _recording_split(self, at):
        split = splitkeras.SplitModel(tiny_models.bn_dropout_model(), at)
        split.compile("sgd", "sgd", loss=_loss(), run_eagerly=True)
        received = []
        handle = split.server.handle

        def record(message):
            received.append(message)
            return handle(message)

        split.server.handle = record
        return split, received

    def test_ushaped_server_never_receives_labels_or_inputs(self):
        x, _, ds = _dataset()
        split, received = self._recording_split(["relu1", "fc1"])
        split.fit(ds.take(2), verbose=0)
        split.evaluate(ds.take(1), verbose=0)
        kinds = [m.kind for m in received]
        self.assertEqual(
            kinds,
            [splitkeras.Kind.TRAIN, splitkeras.Kind.OUTPUT_GRADIENTS] * 2
            + [splitkeras.Kind.EVALUATE],
        )
        for message in received:
            self.assertIsNone(message.labels)
            self.assertIsNone(message.sample_weight)
            for t in message.tensors:
                self.assertNotEqual(tuple(t.shape[1:]), x.shape[1:])

    def test_vanilla_server_receives_cut_tensors_and_labels_only(self):
        _, y, ds = _dataset()
        split, received = self._recording_split("relu1")
        split.fit(ds.take(1), verbose=0)
        (message,) = received
        self.assertEqual(message.kind, splitkeras.Kind.TRAIN)
        self.assertEqual([tuple(t.shape) for t in message.tensors], [(BATCH, 8, 8, 4)])
        np.testing.assert_array_equal(message.labels, y[:BATCH])

    @parameterized.parameters(
        ("float32", 4, 4), ("float16", 2, 2), (("bfloat16", "float32"), 2, 4)
    )
    def test_bytes_counted_each_way(self, codec, up_size, down_size):
        _, _, ds = _dataset()
        split = splitkeras.SplitModel(tiny_models.bn_dropout_model(), "relu1", codec)
        split.compile("sgd", "sgd", loss=_loss())
        split.fit(ds.take(3), verbose=0)
        cut_elems = BATCH * 8 * 8 * 4
        label_bytes = BATCH * 8  # int64 labels travel up in vanilla
        self.assertEqual(
            split.byte_counts(),
            {
                "bytes_up": 3 * (cut_elems * up_size + label_bytes),
                "bytes_down": 3 * (cut_elems * down_size + 4),  # + float32 loss
            },
        )

    def test_same_optimizer_for_both_parties_is_refused(self):
        split = splitkeras.SplitModel(tiny_models.skip_model(), "relu_a")
        opt = keras.optimizers.Adam()
        with self.assertRaisesRegex(ValueError, "each party needs its own"):
            split.compile(opt, opt, loss=_loss())

    def test_unknown_codec_is_refused(self):
        with self.assertRaisesRegex(
            ValueError, r"unknown codec 'int4'; available codecs: float32, float16"
        ):
            splitkeras.get_codec("int4")


class PartyCheckpointTest(base.TestCase):
    def _trained_and_saved(self):
        _, _, ds = _dataset()
        split = splitkeras.SplitModel(tiny_models.bn_dropout_model(), "relu1")
        split.compile("adam", "adam", loss=_loss())
        split.fit(ds.take(2), verbose=0)
        root = self.tempdir()
        paths = {
            p: c.save(f"{root}/{p}/ckpt") for p, c in split.party_checkpoints().items()
        }
        return split, ds, paths

    def test_each_party_saves_only_its_state_including_seeds_and_statistics(self):
        _, _, paths = self._trained_and_saved()
        saved = {
            party: set(tf.train.load_checkpoint(path).get_variable_to_shape_map())
            for party, path in paths.items()
        }
        client_vars = {
            k.split("/")[1] for k in saved["client_0"] if k.startswith("variables/")
        }
        server_vars = {
            k.split("/")[1] for k in saved["server"] if k.startswith("variables/")
        }
        self.assertEqual(
            client_vars,
            {
                "conv1..kernel",
                "bn1..gamma",
                "bn1..beta",
                "bn1..moving_mean",
                "bn1..moving_variance",
            },
        )
        self.assertIn("bn2..moving_mean", server_vars)
        self.assertEqual(
            sum("seed_generator" in name for name in server_vars),
            2,  # two dropouts
        )
        self.assertFalse(client_vars & server_vars)

    def test_restore_brings_back_weights_and_optimizer_state(self):
        split, ds, paths = self._trained_and_saved()
        before = [v.numpy().copy() for v in split.variables]
        split.fit(ds.take(2), verbose=0)
        for party, ckpt in split.party_checkpoints().items():
            ckpt.restore(paths[party]).assert_existing_objects_matched()
        self.assertWeightsClose(before, [v.numpy() for v in split.variables], atol=0)
        self.assertEqual(int(split.server_optimizer.iterations), 2)
