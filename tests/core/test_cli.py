"""The command-line scripts' mistakes are one clear line (splitkeras.cli)."""

import os
import subprocess
import sys

from splitkeras import cli
from splitkeras.configs import fashion_mnist_lenet
from tests import base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "--config=fashion_mnist_lenet"


class CliTest(base.TestCase):
    def test_an_unknown_config_field_is_named(self):
        cwd = os.getcwd()
        os.chdir(ROOT)
        self.addCleanup(os.chdir, cwd)
        cli.check_overrides(["train.py", CONFIG, "--config.train.epochs=2"])
        with self.assertRaisesRegex(
            ValueError,
            r"^unknown config field 'nosuch' \(in --config.nosuch=1\): the config "
            r"has accounting, data, .*train, transport",
        ):
            cli.check_overrides(["train.py", CONFIG, "--config.nosuch=1"])
        with self.assertRaisesRegex(
            ValueError,
            r"^unknown config field 'train.epoch' \(in --config.train.epoch=3\): "
            r"config.train has batch_size, .*epochs",
        ):
            cli.check_overrides(["train.py", CONFIG, "--config.train.epoch=3"])

    def test_values_no_run_can_take(self):
        config = fashion_mnist_lenet.get_config()
        cli.check_config(config)
        cli.check_client_id(0, config)
        for field, text in (
            ("train.epochs", "config.train.epochs=0: it must be at least 1"),
            ("num_clients", "config.num_clients=0: it must be at least 1"),
        ):
            broken = fashion_mnist_lenet.get_config()
            cli.set_fields(broken, {field: 0})
            with self.assertRaisesRegex(ValueError, f"^{text}$"):
                cli.check_config(broken)
        config.num_clients = 2
        with self.assertRaisesRegex(
            ValueError,
            r"^--client_id=5: this run's clients are 0..1 \(config.num_clients=2\)$",
        ):
            cli.check_client_id(5, config)

    def test_a_script_says_one_line(self):
        # `splitkeras launch` with no clients: one line on stderr, exit 1, no
        # traceback and no hang.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "splitkeras",
                "launch",
                CONFIG,
                "--config.num_clients=0",
                f"--workdir={self.tempdir()}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 1)
        ours = [
            line
            for line in done.stderr.splitlines()
            if line.startswith("splitkeras launch:")
        ]
        self.assertEqual(
            ours,
            [
                "splitkeras launch: ValueError: config.num_clients=0: it must "
                "be at least 1"
            ],
        )
        self.assertNotIn("Traceback", done.stderr)
