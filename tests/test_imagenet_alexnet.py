"""The seed's largest setting, smoke-tested: AlexNet (224x224, cut after its
first conv block) on mocked imagenet2012, 2 clients taking turns, the server
mirrored over 2 logical CPUs, with the optimizer (SGD, weight decay) of
splitkeras/configs/imagenet_alexnet.py; evaluation logs top-1 and top-5 accuracy.
The same run with a one-device server ends with the same weights."""

import math
import os

import numpy as np
import tensorflow as tf

from splitkeras import experiment
from splitkeras.builders import build_model, cut_layers, load_data
from splitkeras.client_process import run_client
from splitkeras.configs import imagenet_alexnet
from splitkeras.cut import cut
from tests import base
from tests.data.test_data import _mock_tfds, _prepare_mock_metadata
from tests.distributed.runs import assert_same_weights, in_process_weights, thread_host


def _weights(workdir) -> dict:
    """Every party's final segment weights, by checkpoint name."""
    found = {}
    root = os.path.join(workdir, "checkpoints")
    for party in sorted(os.listdir(root)):
        reader = tf.train.load_checkpoint(
            tf.train.latest_checkpoint(os.path.join(root, party))
        )
        for name in reader.get_variable_to_shape_map():
            if name.startswith("variables/"):
                found[f"{party}/{name}"] = reader.get_tensor(name)
    return found


class ImagenetAlexnetTest(base.TestCase):
    def test_two_clients_and_a_mirrored_server_train(self):
        data_dir = self.tempdir()
        _prepare_mock_metadata(data_dir, "imagenet2012", {"train": 8, "validation": 4})
        config = imagenet_alexnet.get_config()
        self.assertEqual(config.model.cut, "pool1")
        config.data.path = data_dir
        config.num_clients = 2
        config.train.epochs = 1
        # One step per client (4 examples per replica): over more steps the
        # runs drift apart by more than rounding, since a max-pool window
        # whose two largest inputs differ by a rounding error hands its
        # gradient to either (seen: 1e-3 after 4 steps per client).
        config.train.batch_size = 8
        config.train.eval_batch_size = 4
        # Dropout draws differ on two replicas; without it the runs must agree.
        config.model.kwargs.dropout = 0.0
        summaries, weights = {}, {}
        for strategy in ("mirrored", "none"):
            config.server.strategy = strategy
            config.server.logical_cpus = 2 if strategy == "mirrored" else 0
            workdir = self.tempdir()
            with _mock_tfds(data_dir, num_examples=8):
                summaries[strategy] = experiment.train_and_evaluate(config, workdir)
            weights[strategy] = _weights(workdir)
        summary = summaries["mirrored"]
        self.assertEqual(summary["model"], "alexnet")
        self.assertEqual(summary["server_replicas"], 2)
        self.assertEqual(summaries["none"]["server_replicas"], 1)
        # mock_data serves all 8 examples to each shard: 2 clients x 1 step.
        self.assertEqual(summary["steps"], 2)
        self.assertTrue(all(b > 0 for b in summary["per_client"]["bytes_up"]))
        self.assertTrue(math.isfinite(summary["test_loss"]))
        self.assertIn("test_top5_accuracy", summary)
        self.assertEqual(weights["mirrored"].keys(), weights["none"].keys())
        self.assertLen({k.split("/")[0] for k in weights["none"]}, 3)  # 2 + server
        for name, value in weights["none"].items():
            np.testing.assert_allclose(
                weights["mirrored"][name], value, atol=1e-5, err_msg=name
            )
        self.assertAlmostEqual(
            summary["test_loss"], summaries["none"]["test_loss"], places=4
        )


class ImagenetOverGrpcTest(base.TestCase):
    """The seed's largest setting with its client over gRPC: the client
    reads its own stream of its shard (a stream is not cut into sites), and
    the run ends with the in-process run's weights to the bit."""

    def test_a_client_over_grpc_ends_with_the_in_process_weights(self):
        data_dir = self.tempdir()
        _prepare_mock_metadata(data_dir, "imagenet2012", {"train": 8, "validation": 4})
        config = imagenet_alexnet.get_config()
        config.data.path = data_dir
        # One client: two in one process would build TFDS builders in two
        # threads at once, which TFDS does not support (a process each, as
        # `splitkeras launch` starts them, would).
        config.num_clients = 1
        config.train.epochs = 2
        config.train.batch_size = 4
        config.train.eval_batch_size = 4
        with _mock_tfds(data_dir, num_examples=8):
            expected = in_process_weights(config)
            parties, coordinator, _, addresses = thread_host(self, config)
            workdir = self.tempdir()
            summary = run_client(config, 0, addresses, os.urandom(32), workdir)
        # mock_data serves 8 examples: 2 steps of 4 in each of 2 rounds.
        self.assertEqual(summary["steps"], 4)
        self.assertEqual(int(coordinator.step.numpy()), 4)
        client = cut(build_model(config, load_data(config)), cut_layers(config)).client
        client.load_weights(os.path.join(workdir, "client.weights.h5"))
        found = {
            "server/server": parties["server"].segment.get_weights(),
            "client_0/client": client.get_weights(),
        }
        assert_same_weights(self, found, expected)
