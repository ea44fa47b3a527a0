"""The wheel is the product: built from the sources, installed in a fresh
environment with no checkout on its path, its `splitkeras` command trains a
shipped config by name.

The fresh environment borrows the test environment's third-party packages
(TensorFlow and the rest, through a .pth line: downloading them for every
test run would take minutes); splitkeras itself comes only from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from tests import base
from tests.test_experiment import _write_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd, timeout=600):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


class WheelTest(base.TestCase):
    def test_the_installed_command_trains_a_shipped_config(self):
        root = self.tempdir()
        # Build from a copy of the sources, so the checkout stays clean.
        source = os.path.join(root, "source")
        os.makedirs(source)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(os.path.join(ROOT, name), source)
        shutil.copytree(
            os.path.join(ROOT, "splitkeras"),
            os.path.join(source, "splitkeras"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        dist = os.path.join(root, "dist")
        built = _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps"]
            + ["--no-build-isolation", "--quiet", "-w", dist, source],
            cwd=root,
        )
        self.assertEqual(built.returncode, 0, built.stderr[-3000:])
        (wheel,) = [n for n in os.listdir(dist) if n.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(dist, wheel)) as archive:
            names = set(archive.namelist())
            entry_points = next(n for n in names if n.endswith("entry_points.txt"))
            self.assertIn(
                "splitkeras = splitkeras.commands:main",
                archive.read(entry_points).decode(),
            )
        for shipped in (
            "splitkeras/configs/fashion_mnist_lenet.py",
            "splitkeras/configs/base.py",
            "splitkeras/commands/train.py",
            "splitkeras/commands/export.py",
            "splitkeras/__main__.py",
        ):
            self.assertIn(shipped, names)

        venv = os.path.join(root, "venv")
        made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
        self.assertEqual(made.returncode, 0, made.stderr)
        python = os.path.join(venv, "bin", "python")
        purelib = _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            cwd=root,
        ).stdout.strip()
        with open(os.path.join(purelib, "third_party.pth"), "w") as f:
            f.write(sysconfig.get_path("purelib") + "\n")
        installed = _run(
            [sys.executable, "-m", "pip", "--python", python, "install"]
            + ["--no-deps", "--no-index", "--quiet", os.path.join(dist, wheel)],
            cwd=root,
        )
        self.assertEqual(installed.returncode, 0, installed.stderr[-3000:])

        # splitkeras comes from the wheel; the checkout is not on the path.
        where = _run(
            [
                python,
                "-c",
                "import splitkeras, sys; print(splitkeras.__file__); "
                "print('\\n'.join(sys.path))",
            ],
            cwd=root,
        )
        first, *path = where.stdout.splitlines()
        self.assertTrue(first.startswith(purelib), first)
        self.assertNotIn(ROOT, path)

        command = os.path.join(venv, "bin", "splitkeras")
        listed = _run([command, "configs"], cwd=root)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("fashion_mnist_lenet", listed.stdout.split())

        # A shipped config by name, U-shaped with no cut given (the model's
        # default tail cut), on 256 synthetic examples: 4 steps of 64.
        data = _write_npz(os.path.join(root, "data.npz"))
        workdir = os.path.join(root, "run")
        trained = _run(
            [
                command,
                "train",
                "--config=fashion_mnist_lenet",
                f"--workdir={workdir}",
                f"--config.data.path={data}",
                "--config.train.epochs=1",
                "--config.topology=ushaped",
            ],
            cwd=root,
        )
        self.assertEqual(trained.returncode, 0, trained.stderr[-3000:])
        self.assertIn("test accuracy:", trained.stdout)
        with open(os.path.join(workdir, "summary.json")) as f:
            self.assertEqual(json.load(f)["steps"], 4)
