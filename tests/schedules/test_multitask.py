"""Multi-task split learning (one client, one server head per task)."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.protocol import Kind
from splitkeras.schedules.multitask import MultiTask
from tests import base

STEPS = 12
BATCH = 8

OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
}
METRICS = [("accuracy",), ()]  # task 0 classifies, task 1 regresses


def two_task_model(seed=0):
    """8x8x1 -> (3 class logits, 1 score); BatchNorm, Dropout, L2 in the heads."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    a = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv_a")(h)
    a = keras.layers.BatchNormalization(name="bn_a")(a)
    a = keras.layers.ReLU(name="relu_a")(a)
    a = keras.layers.Flatten(name="flat_a")(a)
    a = keras.layers.Dropout(0.3, name="drop_a")(a)
    a = keras.layers.Dense(16, "relu", kernel_regularizer="l2", name="fc_a")(a)
    class_out = keras.layers.Dense(3, name="class_out")(a)
    b = keras.layers.GlobalAveragePooling2D(name="gap_b")(h)
    b = keras.layers.Dense(8, activation="relu", name="fc_b")(b)
    score_out = keras.layers.Dense(1, name="score_out")(b)
    return keras.Model(inp, [class_out, score_out], name="two_task")


def skip_heads_model(seed=0):
    """A skip connection crosses the cut at 'relu_c' but feeds only head 0."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="x")
    stem = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    stem = keras.layers.ReLU(name="stem_relu")(stem)
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv_c")(stem)
    h = keras.layers.ReLU(name="relu_c")(h)
    a = keras.layers.Conv2D(4, 3, padding="same", name="conv_a")(h)
    a = keras.layers.Add(name="add_a")([stem, a])
    a = keras.layers.GlobalAveragePooling2D(name="gap_a")(a)
    class_out = keras.layers.Dense(3, name="class_out")(a)
    b = keras.layers.GlobalAveragePooling2D(name="gap_b")(h)
    score_out = keras.layers.Dense(1, name="score_out")(b)
    return keras.Model(inp, [class_out, score_out], name="skip_heads")


def shared_layer_model():
    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    h = keras.layers.Flatten(name="shared_flat")(h)
    class_out = keras.layers.Dense(3, name="class_out")(h)
    score_out = keras.layers.Dense(1, name="score_out")(h)
    return keras.Model(inp, [class_out, score_out], name="shared")


MODELS = {
    "two_task": (two_task_model, "relu1"),
    "skip_heads": (skip_heads_model, "relu_c"),
}


def _arrays(steps=STEPS):
    rng = np.random.default_rng(0)
    n = steps * BATCH
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y0 = rng.integers(0, 3, n)
    y1 = rng.normal(size=(n, 1)).astype("float32")
    return x, y0, y1


def _dataset(steps=STEPS):
    x, y0, y1 = _arrays(steps)
    return tf.data.Dataset.from_tensor_slices((x, (y0, y1))).batch(BATCH)


def _losses():
    return [
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.losses.MeanSquaredError(),
    ]


def _multitask(model, at, make_opt="sgd", **kwargs):
    return MultiTask(model, at, make_opt, _losses(), metrics=METRICS, **kwargs)


def _record(party):
    received = []
    handle = party.handle
    party.handle = lambda m: received.append(m) or handle(m)
    return received


class MultiTaskParityTest(base.TestCase):
    @parameterized.product(model=list(MODELS), optimizer=list(OPTIMIZERS))
    def test_equals_uncut_fit_with_summed_losses(self, model, optimizer):
        build, at = MODELS[model]
        make_opt = OPTIMIZERS[optimizer]
        ds = _dataset()
        reference = build()
        reference.compile(optimizer=make_opt(), loss=_losses())
        reference.fit(ds, epochs=1, verbose=0, shuffle=False)

        uncut = build()
        initial = [w.copy() for w in uncut.get_weights()]
        multitask = _multitask(uncut, at, make_opt)
        logs = multitask.train_epoch(ds)

        moved = max(abs(a - b).max() for a, b in zip(initial, uncut.get_weights()))
        self.assertGreater(moved, 1e-3)
        self.assertWeightsClose(reference.get_weights(), uncut.get_weights())
        # One client update per step, with the heads' gradients summed.
        self.assertEqual(int(multitask.client.optimizer.iterations), STEPS)
        for head in multitask.heads:
            self.assertEqual(int(head.optimizer.iterations), STEPS)
        self.assertEqual(
            set(logs), {"task_0/loss", "task_0/accuracy", "task_1/loss", "loss"}
        )

    def test_evaluate_and_predict_match_uncut_model(self):
        x, y0, y1 = _arrays(steps=3)
        uncut = skip_heads_model()
        multitask = _multitask(uncut, "relu_c", "adam")
        multitask.train_epoch(_dataset(steps=2))
        expected = uncut.predict(x, batch_size=BATCH, verbose=0)
        got = multitask.predict(x, batch_size=BATCH)
        self.assertLen(got, 2)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g.numpy(), e, atol=1e-6)
        logs = multitask.evaluate(_dataset(steps=3))
        batches = [slice(i, i + BATCH) for i in range(0, len(x), BATCH)]
        for task, (loss, y) in enumerate(zip(_losses(), (y0, y1))):
            mean = np.mean([float(loss(y[s], expected[task][s])) for s in batches])
            self.assertAlmostEqual(logs[f"task_{task}/loss"], mean, places=5)
        accuracy = np.mean(np.argmax(expected[0], -1) == y0)
        self.assertAlmostEqual(logs["task_0/accuracy"], accuracy, places=6)
        self.assertAlmostEqual(
            logs["loss"], logs["task_0/loss"] + logs["task_1/loss"], places=6
        )


class MultiTaskProtocolTest(base.TestCase):
    def test_each_head_receives_only_its_own_labels(self):
        x, y0, y1 = _arrays(steps=2)
        multitask = _multitask(two_task_model(), "relu1", run_eagerly=True)
        received = [_record(head) for head in multitask.heads]
        multitask.train_epoch(_dataset(steps=2))
        multitask.evaluate(_dataset(steps=2).take(1))
        multitask.predict(x[:BATCH])

        kinds = [Kind.TRAIN, Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT]
        for task, (messages, y) in enumerate(zip(received, (y0, y1))):
            self.assertEqual([m.kind for m in messages], kinds, f"head {task}")
            for i, m in enumerate(messages[:3]):
                batch = y[(i % 2) * BATCH : (i % 2 + 1) * BATCH]
                np.testing.assert_array_equal(m.labels, batch)
                self.assertEqual(m.labels.dtype, tf.as_dtype(y.dtype))
            self.assertIsNone(messages[3].labels)
            for m in messages:
                self.assertEqual(
                    [tuple(t.shape) for t in m.tensors], [(BATCH, 8, 8, 4)]
                )

    def test_head_receives_only_the_cut_tensors_it_uses(self):
        multitask = _multitask(skip_heads_model(), "relu_c", run_eagerly=True)
        received = [_record(head) for head in multitask.heads]
        multitask.train_epoch(_dataset(steps=1))
        # Head 0 adds the skip connection; head 1 reads only relu_c's output.
        self.assertLen(received[0][0].tensors, 2)
        self.assertLen(received[1][0].tensors, 1)
        np.testing.assert_array_equal(
            received[1][0].tensors[0].numpy(), received[0][0].tensors[1].numpy()
        )

    @parameterized.parameters(("float32", 4), ("float16", 2))
    def test_bytes_counted_per_head(self, codec, wire_size):
        multitask = _multitask(two_task_model(), "relu1", codec=codec)
        multitask.train_epoch(_dataset(steps=3))
        cut_bytes = BATCH * 8 * 8 * 4 * wire_size
        self.assertEqual(
            multitask.byte_counts(),
            {
                "task_0/bytes_up": [3 * (cut_bytes + BATCH * 8)],  # int64 labels
                "task_0/bytes_down": [3 * (cut_bytes + 4)],  # + float32 loss
                "task_1/bytes_up": [3 * (cut_bytes + BATCH * 4)],  # float32 labels
                "task_1/bytes_down": [3 * (cut_bytes + 4)],
            },
        )

    def test_layer_shared_by_two_heads_is_refused(self):
        with self.assertRaisesRegex(
            ValueError,
            r"layer 'shared_flat' is used by task heads 0 \(output 'class_out'\) "
            r"and 1 \(output 'score_out'\) after the cut at 'conv1'",
        ):
            _multitask(shared_layer_model(), "conv1")

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, r"has 2 outputs but got 1 losses"):
            MultiTask(two_task_model(), "relu1", "sgd", _losses()[:1])
        with self.assertRaisesRegex(ValueError, r"cuts at one layer"):
            _multitask(two_task_model(), ("relu1", "fc_a"))
        multitask = _multitask(two_task_model(), "relu1")
        x, y0, _ = _arrays(steps=1)
        with self.assertRaisesRegex(ValueError, r"got 1 label tensors for 2 tasks"):
            multitask.train_step(x, [y0])


class MultiTaskCheckpointTest(base.TestCase):
    def test_each_party_saves_its_own_state(self):
        multitask = _multitask(two_task_model(), "relu1", "adam")
        multitask.train_epoch(_dataset(steps=2))
        root = self.tempdir()
        paths = {
            p: c.save(f"{root}/{p}/ckpt") for p, c in multitask.checkpoints().items()
        }
        self.assertEqual(list(paths), ["client_0", "head_0", "head_1"])
        saved = {
            p: set(tf.train.load_checkpoint(path).get_variable_to_shape_map())
            for p, path in paths.items()
        }
        weights = {
            p: {k.split("/")[1] for k in keys if k.startswith("variables/")}
            for p, keys in saved.items()
        }
        self.assertIn("conv1..kernel", weights["client_0"])
        self.assertIn("conv_a..kernel", weights["head_0"])
        self.assertIn("fc_b..kernel", weights["head_1"])
        self.assertFalse(weights["head_0"] & weights["head_1"])
        self.assertFalse(weights["client_0"] & (weights["head_0"] | weights["head_1"]))
        self.assertTrue(any(k.startswith("task_1_bytes_up") for k in saved["client_0"]))

        before = [w.copy() for w in multitask.heads[1].segment.get_weights()]
        multitask.train_epoch(_dataset(steps=1))
        for party, checkpoint in multitask.checkpoints().items():
            checkpoint.restore(paths[party]).assert_existing_objects_matched()
        self.assertWeightsClose(
            before, multitask.heads[1].segment.get_weights(), atol=0
        )
        self.assertEqual(int(multitask.heads[1].optimizer.iterations), 2)
