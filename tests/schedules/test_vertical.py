"""Vertical split learning trains exactly like the equivalent uncut model."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.protocol import Kind
from splitkeras.schedules import vertical
from tests import base

STEPS = 10
BATCH = 8
CLASSES = 3
HIDDEN = 3  # units of each client's Dense: the cut width


def _data(n=STEPS * BATCH):
    rng = np.random.default_rng(0)
    images = rng.random((n, 4, 4, 1)).astype("float32")
    y = rng.integers(0, CLASSES, n)
    return images, np.arange(n, dtype=np.int64), y


def _vertical_dataset(images, ids, y, batch=BATCH):
    left, right = vertical.split_image_halves(images)
    slices = ((left, right), (ids, ids), y)
    return tf.data.Dataset.from_tensor_slices(slices).batch(batch)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _sgd():
    return keras.optimizers.SGD(0.1)


def _client(k, units=HIDDEN, use_bias=True):
    inp = keras.Input((4, 2, 1), name=f"half_{k}")
    h = keras.layers.Flatten(name=f"flat_{k}")(inp)
    out = keras.layers.Dense(units, use_bias=use_bias, name=f"dense_{k}")(h)
    return keras.Model(inp, out, name=f"client_{k}")


def _server(width):
    inp = keras.Input((width,), name="merged")
    h = keras.layers.ReLU(name="relu")(inp)
    out = keras.layers.Dense(CLASSES, name="head")(h)
    return keras.Model(inp, out, name="server")


def _split(merge="concat", seed=0, use_bias=True, **kwargs):
    keras.utils.set_random_seed(seed)
    clients = [_client(k, use_bias=use_bias) for k in range(2)]
    width = 2 * HIDDEN if merge == "concat" else HIDDEN
    return vertical.VerticalSplit(
        clients, _server(width), _sgd, _loss(), merge=merge, **kwargs
    )


def _concat_reference(split):
    """The whole-image model: both halves' Dense layers, concatenated, head."""
    image = keras.Input((4, 4, 1), name="image")
    halves = [
        keras.layers.Cropping2D(((0, 0), (0, 2)), name="left")(image),
        keras.layers.Cropping2D(((0, 0), (2, 0)), name="right")(image),
    ]
    cuts = []
    for k, half in enumerate(halves):
        h = keras.layers.Flatten()(half)
        cuts.append(keras.layers.Dense(HIDDEN, name=f"dense_{k}")(h))
    h = keras.layers.ReLU()(keras.layers.Concatenate()(cuts))
    model = keras.Model(image, keras.layers.Dense(CLASSES, name="head")(h))
    for k, client in enumerate(split.clients):
        name = f"dense_{k}"
        model.get_layer(name).set_weights(client.segment.get_layer(name).get_weights())
    model.get_layer("head").set_weights(
        split.server.segment.get_layer("head").get_weights()
    )
    return model


def _concat_weights(model):
    return [model.get_layer(n).get_weights() for n in ("dense_0", "dense_1", "head")]


def _stacked_reference(split, merge):
    """One Dense on the concatenated features, kernel = the clients' row-stack."""
    features = keras.Input((16,), name="features")
    h = keras.layers.Dense(HIDDEN, use_bias=False, name="stacked")(features)
    if merge == "mean":
        h = keras.layers.Rescaling(0.5)(h)
    h = keras.layers.ReLU()(h)
    model = keras.Model(features, keras.layers.Dense(CLASSES, name="head")(h))
    kernels = [
        c.segment.get_layer(f"dense_{k}").get_weights()[0]
        for k, c in enumerate(split.clients)
    ]
    model.get_layer("stacked").set_weights([np.vstack(kernels)])
    model.get_layer("head").set_weights(
        split.server.segment.get_layer("head").get_weights()
    )
    return model


def _stacked_weights(model):
    kernel = model.get_layer("stacked").kernel.numpy()
    return [[kernel[:8]], [kernel[8:]], model.get_layer("head").get_weights()]


def _split_weights(split):
    layers = [c.segment.get_layer(f"dense_{k}") for k, c in enumerate(split.clients)]
    layers.append(split.server.segment.get_layer("head"))
    return [layer.get_weights() for layer in layers]


def _concatenated_features(images):
    left, right = vertical.split_image_halves(images)
    return np.concatenate(
        [left.reshape(len(images), -1), right.reshape(len(images), -1)], 1
    )


class ExactnessTest(base.TestCase):
    def _assert_same(self, ours, theirs, before):
        ours, theirs, before = (sum(w, []) for w in (ours, theirs, before))
        self.assertGreater(max(abs(a - b).max() for a, b in zip(ours, before)), 1e-3)
        self.assertWeightsClose(ours, theirs, atol=1e-5)

    @parameterized.parameters(False, True)
    def test_concat_equals_whole_image_model(self, run_eagerly):
        images, ids, y = _data()
        split = _split("concat", run_eagerly=run_eagerly)
        reference = _concat_reference(split)
        before = _split_weights(split)
        reference.compile(optimizer=_sgd(), loss=_loss())
        reference.fit(images, y, batch_size=BATCH, shuffle=False, verbose=0)
        split.train_epoch(_vertical_dataset(images, ids, y))
        self._assert_same(_split_weights(split), _concat_weights(reference), before)
        for party in [*split.clients, split.server]:
            self.assertEqual(int(party.optimizer.iterations), STEPS)

    @parameterized.parameters("sum", "mean")
    def test_sum_and_mean_equal_row_stacked_dense(self, merge):
        images, ids, y = _data()
        split = _split(merge, use_bias=False)
        reference = _stacked_reference(split, merge)
        before = _split_weights(split)
        reference.compile(optimizer=_sgd(), loss=_loss())
        features = _concatenated_features(images)
        reference.fit(features, y, batch_size=BATCH, shuffle=False, verbose=0)
        split.train_epoch(_vertical_dataset(images, ids, y))
        self._assert_same(_split_weights(split), _stacked_weights(reference), before)

    def test_evaluate_and_predict_match_equivalent_model(self):
        images, ids, y = _data()
        split = _split("concat")
        split.train_epoch(_vertical_dataset(images, ids, y).take(3))
        reference = _concat_reference(split)
        reference.compile(loss=_loss(), metrics=["accuracy"])
        theirs = reference.evaluate(
            images, y, batch_size=BATCH, verbose=0, return_dict=True
        )
        ours = split.evaluate(_vertical_dataset(images, ids, y))
        self.assertAlmostEqual(ours["loss"], theirs["loss"], places=5)
        self.assertAlmostEqual(ours["accuracy"], theirs["accuracy"], places=6)
        left, right = vertical.split_image_halves(images)
        np.testing.assert_allclose(
            split.predict([left, right], [ids, ids], batch_size=32).numpy(),
            reference.predict(images, batch_size=32, verbose=0),
            atol=1e-5,
        )


class ProtocolTest(base.TestCase):
    @parameterized.parameters(0, 1)
    def test_server_gets_cut_tensors_and_only_the_owner_labels(self, label_client):
        images, ids, y = _data(2 * BATCH)
        split = _split("concat", label_client=label_client, run_eagerly=True)
        received, replied = [], []
        handle_batch = split.server.handle_batch

        def record(messages):
            received.append(list(messages))
            replied.append(handle_batch(messages))
            return replied[-1]

        split.server.handle_batch = record
        ds = _vertical_dataset(images, ids, y)
        split.train_epoch(ds)
        split.evaluate(ds.take(1))
        kinds = [[m.kind for m in batch] for batch in received]
        self.assertEqual(kinds, [[Kind.TRAIN] * 2] * 2 + [[Kind.EVALUATE] * 2])
        label_rows = [y[:BATCH], y[BATCH:], y[:BATCH]]  # two train, one eval
        for batch, replies, labels in zip(received, replied, label_rows):
            for message, reply in zip(batch, replies):
                owner = message.client_id == label_client
                self.assertEqual(message.labels is not None, owner)
                self.assertEqual(reply.loss is not None, owner)
                self.assertIsNone(message.sample_weight)
                self.assertEqual([t.shape for t in message.tensors], [(BATCH, HIDDEN)])
                self.assertEqual(message.ids.dtype, tf.int64)
            np.testing.assert_array_equal(batch[label_client].labels, labels)

    @parameterized.named_parameters(
        ("compiled", {}),
        ("eager", {"run_eagerly": True}),
        ("xla", {"jit_compile": True}),  # the check runs beside the XLA step
    )
    def test_mismatched_ids_raise_naming_position_and_ids(self, mode):
        images, ids, y = _data(4)
        split = _split("sum", **mode)
        before = _split_weights(split)
        left, right = vertical.split_image_halves(images)
        swapped = np.array([0, 1, 3, 2], np.int64)
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError,
            "sample ids of client 1 differ from those of client 0 at position 2: "
            "client 0 has id 2, client 1 has id 3",
        ):
            split.train_step(([left, right], [ids, swapped], y))
        # The failed check stops the step before any party updates.
        self.assertWeightsClose(sum(_split_weights(split), []), sum(before, []), 0)

    def test_align_reorders_rows_by_id(self):
        ids = [np.array([3, 1, 2, 0]), np.array([2, 0, 3, 1])]
        features = [ids[0][:, None] * 10.0, ids[1][:, None] * 100.0]
        common, aligned = vertical.align(ids, features)
        np.testing.assert_array_equal(common, [0, 1, 2, 3])
        np.testing.assert_array_equal(aligned[0][:, 0], [0, 10, 20, 30])
        np.testing.assert_array_equal(aligned[1][:, 0], [0, 100, 200, 300])

    def test_align_names_missing_ids_and_client(self):
        ids = [np.arange(10), np.array([0, 1, 2])]
        with self.assertRaisesRegex(
            ValueError, r"client 1 lacks ids \[3, 4, 5, 6, 7\] \(and 2 more\)"
        ):
            vertical.align(ids, [np.zeros((10, 2)), np.zeros((3, 2))])
        with self.assertRaisesRegex(ValueError, r"client 0 lacks ids \[7\]"):
            vertical.align([[1, 2], [2, 7, 1]], [np.zeros((2, 1)), np.zeros((3, 1))])

    def test_split_image_halves(self):
        images = np.arange(2 * 3 * 5).reshape(2, 3, 5, 1)
        left, right = vertical.split_image_halves(images)
        self.assertEqual((left.shape, right.shape), ((2, 3, 2, 1), (2, 3, 3, 1)))
        np.testing.assert_array_equal(np.concatenate([left, right], 2), images)


class BytesTest(base.TestCase):
    @parameterized.parameters(("float32", 4), ("float16", 2))
    def test_byte_counts_are_exact(self, codec, wire):
        n = 4
        images, ids, y = _data(n)
        keras.utils.set_random_seed(0)
        split = vertical.VerticalSplit(
            [_client(0, units=3), _client(1, units=2)],
            _server(5),
            _sgd,
            _loss(),
            codec=codec,
        )
        ds = _vertical_dataset(images, ids, y, batch=n)
        split.train_epoch(ds.repeat(2))
        id_bytes = label_bytes = n * 8  # int64 ids and labels
        up = [n * 3 * wire + id_bytes + label_bytes, n * 2 * wire + id_bytes]
        down = [n * 3 * wire + 4, n * 2 * wire]  # + the float32 loss to the owner
        counts = split.byte_counts()
        self.assertEqual(
            counts,
            {"bytes_up": [2 * u for u in up], "bytes_down": [2 * d for d in down]},
        )

        split.evaluate(ds)  # cut tensors, ids, labels up; the loss down
        counts = split.byte_counts()
        self.assertEqual(counts["bytes_up"], [3 * u for u in up])
        self.assertEqual(counts["bytes_down"], [2 * down[0] + 4, 2 * down[1]])


class CheckpointTest(base.TestCase):
    def test_party_checkpoints_round_trip(self):
        images, ids, y = _data(4 * BATCH)
        ds = _vertical_dataset(images, ids, y)
        split = _split("mean")
        split.train_epoch(ds.take(1))
        checkpoints = split.checkpoints()
        self.assertEqual(set(checkpoints), {"client_0", "client_1", "server"})
        root = self.tempdir()
        paths = {name: c.write(f"{root}/{name}") for name, c in checkpoints.items()}
        saved = _split_weights(split)
        split.train_epoch(ds.skip(1))
        for name, checkpoint in checkpoints.items():
            checkpoint.read(paths[name]).assert_consumed()
        self.assertWeightsClose(sum(_split_weights(split), []), sum(saved, []), 0)
        self.assertEqual(int(split.server.optimizer.iterations), 1)
