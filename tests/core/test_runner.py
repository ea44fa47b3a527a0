"""The Runner's summary: its test figures are the last round's, or none
with the reason, never an earlier round's passed off as final."""

import json
import os

from splitkeras.configs import fashion_mnist_lenet
from splitkeras.experiment import summary_fields
from splitkeras.runner import Runner, RunnerProcess
from tests import base


class _Process(RunnerProcess):
    """Two rounds of one step; only the first is evaluated (the second
    round's evaluating client was skipped)."""

    rounds = 2

    def __init__(self, config):
        self.config = config

    def round(self, epoch, skip=0):
        yield None

    def logs(self, epoch):
        validation = {"accuracy": 0.75, "loss": 0.5} if epoch == 0 else {}
        return {"loss": 1.0}, validation

    def summary(self, test):
        return summary_fields(self.config, "fashion_mnist", test)


class RunnerSummaryTest(base.TestCase):
    def test_a_last_round_without_evaluation_has_no_test_figures(self):
        config = fashion_mnist_lenet.get_config()
        workdir = self.tempdir()
        summary = Runner(config, workdir, _Process(config)).run()
        self.assertNotIn("test_accuracy", summary)
        self.assertNotIn("test_loss", summary)
        self.assertEqual(
            summary["test_figures"],
            "none: the last round ended without an evaluation (its evaluating "
            "client's turn was skipped, or there is no test data)",
        )
        with open(os.path.join(workdir, "summary.json")) as f:
            self.assertEqual(json.load(f)["test_figures"], summary["test_figures"])
