"""The `splitkeras` commands' mistakes are one clear line (splitkeras.cli)."""

import json
import os
import subprocess
import sys

import numpy as np

from splitkeras import builders, cli, runner
from splitkeras.configs import cifar10_vgg, fashion_mnist_lenet
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
        for field, value, text in (
            ("train.epochs", 0, "config.train.epochs=0: it must be at least 1"),
            ("num_clients", 0, "config.num_clients=0: it must be at least 1"),
            (
                "train.batch_size",
                0,
                "config.train.batch_size=0: it must be at least 1",
            ),
            (
                "runtime.intra_op_threads",
                -1,
                r"config.runtime.intra_op_threads=-1: it must be 0 \(TensorFlow's "
                r"default\) or more",
            ),
            (
                "runtime.inter_op_threads",
                1,
                r"config.runtime.inter_op_threads=1: a U-shaped server's step "
                r"holds one inter-op thread while it waits for its second "
                r"message; use 0 \(TensorFlow's default\) or at least 2",
            ),
        ):
            broken = fashion_mnist_lenet.get_config()
            cli.set_fields(broken, {field: value})
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
        command = [
            sys.executable,
            "-m",
            "splitkeras",
            "launch",
            CONFIG,
            "--config.num_clients=0",
            f"--workdir={self.tempdir()}",
        ]

        def run(**env):
            return subprocess.run(
                command,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, **env},
            )

        done = run()
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
        # SPLITKERAS_TRACEBACK=1 shows where it came from.
        shown = run(SPLITKERAS_TRACEBACK="1")
        self.assertEqual(shown.returncode, 1)
        self.assertIn("Traceback (most recent call last)", shown.stderr)
        self.assertIn("config.num_clients=0: it must be at least 1", shown.stderr)

    def test_a_config_is_a_shipped_name_or_a_path(self):
        shipped = os.path.join(ROOT, "splitkeras", "configs", "cifar10_vgg.py")
        self.assertEqual(cli.config_path("cifar10_vgg"), shipped)
        self.assertEqual(cli.config_path("cifar10_vgg:arg"), f"{shipped}:arg")
        self.assertEqual(cli.config_path(shipped), shipped)
        self.assertIn("fashion_mnist_lenet", cli.config_names())
        self.assertNotIn("__init__", cli.config_names())
        self.assertNotIn("base", cli.config_names())
        # A bare name is the shipped config, even beside a folder of that
        # name (a workdir named after its config).
        folder = os.path.join(self.tempdir(), "cifar10_vgg")
        os.makedirs(folder)
        cwd = os.getcwd()
        os.chdir(os.path.dirname(folder))
        self.addCleanup(os.chdir, cwd)
        self.assertEqual(cli.config_path("cifar10_vgg"), shipped)
        with self.assertRaisesRegex(ValueError, "no such config file"):
            cli.config_path("./cifar10_vgg")
        with self.assertRaisesRegex(
            ValueError,
            r"^--config=cifar11_vgg: no such config file, and no shipped config "
            r"of that name; shipped configs: cifar100_resnet50, .*, "
            r"mnist_lenet$",
        ):
            cli.config_path("cifar11_vgg")
        # Overrides are checked against the named config too.
        with self.assertRaisesRegex(ValueError, r"^unknown config field 'nosuch'"):
            cli.check_overrides(
                ["train", "--config", "cifar10_vgg", "--config.nosuch=1"]
            )

    def test_an_unknown_command_lists_the_commands(self):
        done = subprocess.run(
            [sys.executable, "-m", "splitkeras", "trian"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 2)
        self.assertIn("splitkeras: unknown command 'trian'", done.stderr)
        for name in ("train", "serve", "client", "launch", "export"):
            self.assertIn(f"\n  {name} ", done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_ushaped_vgg16_trains_with_no_cut_given(self):
        # The shipped CIFAR-10 config names one cut; U-shaped takes VGG-16's
        # default tail cut (drop2) as its second. 16 examples of 32x32x3.
        root = self.tempdir()
        rng = np.random.default_rng(0)
        data = os.path.join(root, "data.npz")
        np.savez(
            data,
            x_train=rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
            y_train=np.arange(16) % 10,
            x_test=rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8),
            y_test=np.arange(8) % 10,
        )
        workdir = os.path.join(root, "run")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "splitkeras",
                "train",
                "--config=cifar10_vgg",
                "--config.topology=ushaped",
                f"--config.data.path={data}",
                "--config.train.epochs=1",
                "--config.train.batch_size=8",
                "--config.runtime.intra_op_threads=1",
                "--config.runtime.inter_op_threads=2",
                f"--workdir={workdir}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn("TensorFlow threads: intra-op 1, inter-op 2", done.stderr)
        with open(os.path.join(workdir, "summary.json")) as f:
            self.assertEqual(json.load(f)["steps"], 2)
        config = cifar10_vgg.get_config()
        config.topology = "ushaped"
        self.assertEqual(builders.cut_layers(config), ("block1_relu1", "drop2"))

    def test_a_finished_run_is_its_own_config(self):
        # `splitkeras export --workdir=W`: W's config.json is the config, and
        # --config.<field> overrides apply on top of it.
        workdir = self.tempdir()
        config = fashion_mnist_lenet.get_config()
        config.num_clients = 3
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort())
        argv = ["export", f"--workdir={workdir}", "--config.data.path=/moved"]
        rewritten = cli.with_run_config(argv)
        run_config = os.path.join(ROOT, "splitkeras", "configs", "_workdir.py")
        self.assertEqual(rewritten[1], f"--config={run_config}:{workdir}")
        self.assertEqual(rewritten[2:], argv[1:])
        cli.check_overrides(rewritten)  # data.path is a field of the run's
        with self.assertRaisesRegex(ValueError, r"^unknown config field 'nosuch'"):
            cli.check_overrides([*rewritten, "--config.nosuch=1"])
        self.assertEqual(runner.read_config(workdir).num_clients, 3)
        # An explicit --config wins; no workdir, nothing to read.
        explicit = [*argv, CONFIG]
        self.assertEqual(cli.with_run_config(explicit), explicit)
        untrained = ["export", "--untrained"]
        self.assertEqual(cli.with_run_config(untrained), untrained)
        with self.assertRaisesRegex(FileNotFoundError, "is not a run's workdir"):
            runner.read_config(self.tempdir())

    def test_a_launcher_hands_on_every_config_flag(self):
        args = [
            "--config=/configs/lenet.py",
            "--workdir=w",
            "--config.train.epochs",
            "2",
            "--config.train.learning_rate",
            "-0.5",
            "--noconfig.train.jit_compile",
            "--config.privacy.nopeek_alpha=0.1",
            "--tls",
            "--config.train.jit_compile",
            "--clients=2",
        ]
        self.assertEqual(
            cli.config_args(args),
            [
                "--config=/configs/lenet.py",
                "--config.train.epochs=2",
                "--config.train.learning_rate=-0.5",
                "--noconfig.train.jit_compile",
                "--config.privacy.nopeek_alpha=0.1",
                "--config.train.jit_compile",
            ],
        )
