"""The federated baselines train exactly as their centralized equivalents."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from splitkeras.schedules.fedavg import FedAvg
from splitkeras.schedules.large_batch_sgd import LargeBatchSGD
from tests import base, tiny_models

DENSE_WEIGHTS = 64 * 16 + 16 + 16 * 3 + 3  # dense_model
BN_WEIGHTS = 64 * 8 + 8 + 4 * 8 + 8 * 3 + 3  # bn_model (gamma, beta, mean, var)
BN_DROPOUT_WEIGHTS = 3 * 3 * 4 + 4 * 4 + 3 * 3 * 4 * 4 + 4 * 4 + 256 * 16 + 16 + 51

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    # Adagrad's accumulators start at 0.1: a reset to zeros would show.
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
}


def dense_model(seed=0):
    """No batch norm, no dropout: 8x8x1 -> 3 logits."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Flatten(name="flatten")(inp)
    h = keras.layers.Dense(16, activation="relu", name="fc1")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h), name="dense")


def bn_model(seed=0):
    """Batch norm without dropout, so client order cannot change the noise."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Flatten(name="flatten")(inp)
    h = keras.layers.Dense(8, name="fc1")(h)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h), name="bn")


MODELS = {
    "dense": dense_model,
    "bn": bn_model,
    "bn_dropout": tiny_models.bn_dropout_model,
}


def _arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def _dataset(n, seed, batch=8):
    return tf.data.Dataset.from_tensor_slices(_arrays(n, seed)).batch(batch)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compiled(build, optimizer=None, weights=None):
    model = build()
    if weights is not None:
        model.set_weights(weights)
    model.compile(optimizer=optimizer, loss=_loss(), metrics=["accuracy"])
    return model


def _max_change(before, after):
    return max(np.abs(a - b).max() for a, b in zip(before, after))


class LargeBatchSGDTest(base.TestCase):
    @parameterized.named_parameters(
        ("equal_batches", [4, 4, 4]), ("unequal_batches", [2, 3, 7])
    )
    def test_equals_centralized_on_concatenated_batches(self, sizes):
        make_opt = OPTIMIZERS["sgd_momentum"]
        lb = LargeBatchSGD(dense_model, len(sizes), make_opt, _loss())
        reference = _compiled(dense_model, make_opt())
        initial = reference.get_weights()
        for step in range(5):
            batches = [_arrays(n, seed=10 * step + k) for k, n in enumerate(sizes)]
            lb.train_step(batches)
            reference.train_on_batch(
                np.concatenate([x for x, _ in batches]),
                np.concatenate([y for _, y in batches]),
            )
        self.assertGreater(_max_change(initial, reference.get_weights()), 1e-3)
        self.assertWeightsClose(lb.model.get_weights(), reference.get_weights())

    def test_batch_norm_statistics_are_averaged_once_per_step(self):
        # K identical batches are one batch: the statistics must move once per
        # step, not once per client.
        make_opt = OPTIMIZERS["sgd"]
        lb = LargeBatchSGD(bn_model, 3, make_opt, _loss())
        reference = _compiled(bn_model, make_opt())
        for step in range(3):
            x, y = _arrays(8, seed=step)
            lb.train_step([(x, y)] * 3)
            reference.train_on_batch(x, y)
        self.assertWeightsClose(lb.model.get_weights(), reference.get_weights())
        self.assertEqual(lb.byte_counts()["bytes_up"], [3 * 4 * BN_WEIGHTS] * 3)

        # Different batches: the moving mean is the concatenated batch's.
        lb = LargeBatchSGD(bn_model, 2, make_opt, _loss())
        reference = _compiled(bn_model, make_opt())
        batches = [_arrays(4, seed=1), _arrays(12, seed=2)]
        lb.train_step(batches)
        reference.train_on_batch(
            np.concatenate([x for x, _ in batches]),
            np.concatenate([y for _, y in batches]),
        )
        mean = lb.model.get_layer("bn1").moving_mean.numpy()
        expected = reference.get_layer("bn1").moving_mean.numpy()
        self.assertGreater(np.abs(mean).max(), 1e-3)
        np.testing.assert_allclose(mean, expected, atol=1e-6)

    def test_epoch_goes_on_without_exhausted_clients(self):
        make_opt = OPTIMIZERS["sgd"]
        lb = LargeBatchSGD(dense_model, 3, make_opt, _loss())
        batches = [3, 1, 2]  # batches of 4 per client
        arrays = [_arrays(4 * n, seed=k) for k, n in enumerate(batches)]
        datasets = [tf.data.Dataset.from_tensor_slices(a).batch(4) for a in arrays]
        logs = lb.train_epoch(datasets)

        reference = _compiled(dense_model, make_opt())
        for step in range(3):
            taking_part = [a for a, n in zip(arrays, batches) if step < n]
            reference.train_on_batch(
                np.concatenate([x[4 * step : 4 * step + 4] for x, _ in taking_part]),
                np.concatenate([y[4 * step : 4 * step + 4] for _, y in taking_part]),
            )
        self.assertWeightsClose(lb.model.get_weights(), reference.get_weights())
        self.assertEqual(set(logs), {"loss", "accuracy"})
        self.assertEqual(
            lb.byte_counts(),
            {
                "bytes_up": [n * 4 * DENSE_WEIGHTS for n in batches],
                "bytes_down": [n * 4 * DENSE_WEIGHTS for n in batches],
            },
        )


class FedAvgTest(base.TestCase):
    @parameterized.named_parameters(
        ("dense_sgd", "dense", "sgd", 1, 1),
        ("bn_dropout_adam", "bn_dropout", "adam", 1, 1),
        ("fresh_optimizer_each_round", "dense", "adagrad", 2, 2),
        ("bn_dropout_momentum_two_rounds", "bn_dropout", "sgd_momentum", 1, 2),
    )
    def test_one_client_equals_centralized(self, model, optimizer, epochs, rounds):
        build, make_opt = MODELS[model], OPTIMIZERS[optimizer]
        fedavg = FedAvg(build, 1, make_opt, _loss(), local_epochs=epochs)
        reference = build()
        initial = reference.get_weights()
        for r in range(rounds):
            fedavg.train_round([_dataset(40, seed=r)])
            # A fresh optimizer per round: local state does not persist.
            reference.compile(optimizer=make_opt(), loss=_loss())
            reference.fit(_dataset(40, seed=r), epochs=epochs, shuffle=False, verbose=0)
        self.assertGreater(_max_change(initial, reference.get_weights()), 1e-3)
        self.assertWeightsClose(
            fedavg.global_model.get_weights(), reference.get_weights()
        )

    def test_two_clients_average_weighted_by_examples(self):
        make_opt = OPTIMIZERS["adam"]
        build = tiny_models.bn_dropout_model
        sizes = [24, 44]  # the last batch of client 1 has 4 examples
        fedavg = FedAvg(build, 2, make_opt, _loss())
        logs = fedavg.train_round([_dataset(n, seed=k) for k, n in enumerate(sizes)])

        trained = []
        for k, n in enumerate(sizes):
            model = _compiled(build, make_opt())
            model.fit(_dataset(n, seed=k), shuffle=False, verbose=0)
            trained.append(model.get_weights())
        fractions = [n / sum(sizes) for n in sizes]
        expected = [sum(f * w for f, w in zip(fractions, ws)) for ws in zip(*trained)]
        unweighted = [(a + b) / 2 for a, b in zip(*trained)]
        got = fedavg.global_model.get_weights()
        self.assertWeightsClose(got, expected)
        self.assertGreater(_max_change(got, unweighted), 1e-4)
        self.assertEqual(set(logs), {"loss", "accuracy"})

        one_model = 4 * BN_DROPOUT_WEIGHTS  # batch-norm statistics included
        self.assertEqual(fedavg.global_model.count_params(), BN_DROPOUT_WEIGHTS)
        counts = {"bytes_up": [one_model] * 2, "bytes_down": [one_model] * 2}
        self.assertEqual(fedavg.byte_counts(), counts)
        fedavg.train_round([_dataset(n, seed=5 + k) for k, n in enumerate(sizes)])
        counts = {key: [2 * one_model] * 2 for key in counts}
        self.assertEqual(fedavg.byte_counts(), counts)
        # Traced once per shape (full, then short batch), not once per round.
        traces = [step.experimental_get_tracing_count() for step in fedavg._steps]
        self.assertEqual(traces, [1, 2])

    def test_the_server_counts_every_clients_local_steps(self):
        # Each client BEGINs with its batches, as a client process does; the
        # server counts them x local epochs at END (2 x (3 + 6) per round).
        fedavg = FedAvg(dense_model, 2, OPTIMIZERS["sgd"], _loss(), local_epochs=2)
        fedavg.train_round([_dataset(24, seed=0), _dataset(44, seed=1)])
        self.assertEqual(int(fedavg.coordinator.step.numpy()), 18)
        fedavg.train_round([_dataset(24, seed=2), _dataset(44, seed=3)])
        self.assertEqual(int(fedavg.coordinator.step.numpy()), 36)


def _schedule(name, build, num_clients=2):
    if name == "fedavg":
        return FedAvg(build, num_clients, OPTIMIZERS["adam"], _loss())
    return LargeBatchSGD(build, num_clients, OPTIMIZERS["adam"], _loss())


def _train(schedule, datasets):
    if isinstance(schedule, FedAvg):
        return schedule.train_round(datasets)
    return schedule.train_epoch(datasets)


def _model(schedule):
    return schedule.global_model if isinstance(schedule, FedAvg) else schedule.model


class BaselinesTest(base.TestCase):
    @parameterized.parameters("fedavg", "large_batch_sgd")
    def test_evaluate_matches_keras_evaluate(self, name):
        # bn_model has no regularizer, which Keras's evaluate loss would add.
        schedule = _schedule(name, bn_model)
        _train(schedule, [_dataset(16, seed=0), _dataset(24, seed=1)])
        data = _dataset(20, seed=2)  # 8 + 8 + 4: a short last batch
        copy = _compiled(bn_model, weights=_model(schedule).get_weights())
        expected = copy.evaluate(data, verbose=0, return_dict=True)
        got = schedule.evaluate(data)
        self.assertAlmostEqual(got["loss"], expected["loss"], places=5)
        self.assertAlmostEqual(got["accuracy"], expected["accuracy"], places=6)

    @parameterized.parameters("fedavg", "large_batch_sgd")
    def test_checkpoint_restores_the_trained_state(self, name):
        schedule = _schedule(name, dense_model)
        datasets = [_dataset(16, seed=0), _dataset(8, seed=1)]
        _train(schedule, datasets)
        saved = _model(schedule).get_weights()
        path = schedule.checkpoint().save(f"{self.tempdir()}/ckpt")
        _train(schedule, datasets)
        self.assertGreater(_max_change(saved, _model(schedule).get_weights()), 1e-4)
        schedule.checkpoint().restore(path).assert_existing_objects_matched()
        self.assertWeightsClose(_model(schedule).get_weights(), saved, atol=0)
        if name == "large_batch_sgd":
            self.assertEqual(int(schedule.optimizer.iterations), 2)

    @parameterized.named_parameters(
        ("fedavg", "fedavg", _train, "client datasets"),
        ("large_batch_sgd_epoch", "large_batch_sgd", _train, "client datasets"),
        (
            "large_batch_sgd_step",
            "large_batch_sgd",
            lambda s, d: s.train_step([_arrays(4, seed=0)] * len(d)),
            "client batches",
        ),
    )
    def test_one_input_per_client_is_required(self, name, train, what):
        schedule = _schedule(name, dense_model, num_clients=2)
        with self.assertRaisesWithLiteralMatch(
            ValueError, f"got 3 {what} for 2 clients; pass one per client"
        ):
            train(schedule, [_dataset(8, seed=k) for k in range(3)])

    @parameterized.parameters(FedAvg, LargeBatchSGD)
    def test_num_clients_must_be_positive(self, cls):
        with self.assertRaisesWithLiteralMatch(
            ValueError, "num_clients must be a positive integer, got 0"
        ):
            cls(dense_model, 0, OPTIMIZERS["sgd"], _loss())
