"""The seed's largest setting, smoke-tested: AlexNet (224x224, cut after its
first conv block) on mocked imagenet2012, 2 clients taking turns, the server
mirrored over 2 logical CPUs; evaluation logs top-1 and top-5 accuracy."""

import math
import os

from configs import imagenet_alexnet
from splitkeras import experiment
from tests import base
from tests.data.test_data import _mock_tfds, _prepare_mock_metadata


class ImagenetAlexnetTest(base.TestCase):
    def test_two_clients_and_a_mirrored_server_train(self):
        data_dir, workdir = self.tempdir(), self.tempdir()
        _prepare_mock_metadata(data_dir, "imagenet2012", {"train": 8, "validation": 4})
        config = imagenet_alexnet.get_config()
        config.data.path = data_dir
        config.num_clients = 2
        config.train.epochs = 1
        config.train.batch_size = 2
        config.train.eval_batch_size = 4
        config.server.strategy = "mirrored"
        config.server.logical_cpus = 2
        self.assertEqual(config.model.cut, "pool1")
        with _mock_tfds(data_dir, num_examples=8):
            summary = experiment.train_and_evaluate(config, workdir)
        self.assertEqual(summary["model"], "alexnet")
        self.assertEqual(summary["server_replicas"], 2)
        self.assertGreaterEqual(summary["steps"], 4)  # both clients, 2+ steps each
        self.assertTrue(all(b > 0 for b in summary["per_client"]["bytes_up"]))
        self.assertTrue(math.isfinite(summary["test_loss"]))
        self.assertIn("test_top5_accuracy", summary)
        self.assertGreaterEqual(summary["test_top5_accuracy"], summary["test_accuracy"])
        self.assertTrue(os.path.exists(os.path.join(workdir, "checkpoints", "server")))
