"""The one base test case of the suite."""

import atexit
import os
import shutil
import tempfile

import keras
from absl.testing import parameterized

# Importing TFDS leaves temporary folders behind: keep them out of /tmp, in
# one folder per test process, removed when the process ends (the runs'
# checkpoints and logs take about 1 GB per process).
if "TMPDIR" not in os.environ:
    _made = tempfile.mkdtemp(prefix="splitkeras-tests-")
    os.environ["TMPDIR"] = _made
    atexit.register(shutil.rmtree, _made, ignore_errors=True)
tempfile.tempdir = None  # mkdtemp cached /tmp: look at TMPDIR again


class TestCase(parameterized.TestCase):
    """Clears the Keras session before each test so names and seeds repeat."""

    def setUp(self):
        super().setUp()
        keras.backend.clear_session()

    def record(self, line: str) -> None:
        """A line for the test run's summary (printed at its end, also
        under pytest-xdist; see conftest.py)."""
        node = getattr(self, "_pytest_node", None)
        if node is None:
            print(line)
        else:
            node.user_properties.append(("summary", line))

    def tempdir(self) -> str:
        """A fresh directory under TMPDIR (absltest's needs parsed flags)."""
        return tempfile.mkdtemp(dir=os.environ["TMPDIR"])

    def assertWeightsClose(self, a, b, atol=1e-5):
        self.assertEqual(len(a), len(b))
        for i, (wa, wb) in enumerate(zip(a, b)):
            self.assertEqual(wa.shape, wb.shape, f"weight {i}")
            diff = abs(wa - wb).max() if wa.size else 0.0
            self.assertLessEqual(diff, atol, f"weight {i} differs by {diff}")
