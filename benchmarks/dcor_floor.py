"""What the leakage figure reads for inputs unrelated to the images, and how
much of a trained client's cut output is non-zero.

`leakage_dcor` is the biased distance correlation of the first
`config.privacy.leakage_examples` (512) Fashion-MNIST test images with the
client's cut tensors of them. Its floor is not 0, and the class labels alone
score well above it. This prints, on those images (as the input pipeline
gives them):

- dCor of the images with the same images in a random order (pairs that
  have nothing to do with each other), for 512 rows (the leakage figure's
  size), 320 (a NoPeek step's estimate: a batch of 64 with its window of
  256) and 64 (one batch), over `--shuffles` random orders (mean, min, max);
- dCor of the images with their one-hot labels;
- for each of `--workdirs` (single-client split runs, e.g. those of
  `splitkeras privacy-report` or `splitkeras train`): the trained client's
  `leakage_dcor` and the fraction of its cut entries that are non-zero on
  those images (a ReLU cut: units gone silent are zeros).

  python benchmarks/dcor_floor.py
  python benchmarks/dcor_floor.py --workdirs=workdirs/privacy_5_s0/alpha0.7
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import builders  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402
from splitkeras.privacy.distance_correlation import distance_correlation  # noqa: E402
from splitkeras.privacy.leakage import images_of  # noqa: E402
from splitkeras.privacy.rows import flat_batch  # noqa: E402
from splitkeras.protocol import flat  # noqa: E402
from splitkeras.runner import read_config  # noqa: E402
from splitkeras.studies.privacy_report import restore_client_segment  # noqa: E402

_SHUFFLES = flags.DEFINE_integer("shuffles", 5, "Random orders per size.")
_SIZES = flags.DEFINE_list("sizes", ["512", "320", "64"], "Rows of the pairs.")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "Trained single-client runs.")


def _dcor(x, z) -> float:
    return float(distance_correlation(flat_batch(x), flat_batch(z)))


def main(argv):
    del argv
    config = fashion_mnist_lenet.get_config()
    arrays = builders.load_data(config)
    n = int(config.privacy.leakage_examples)
    x = images_of(arrays.x_test[:n], arrays.y_test[:n])
    y = np.asarray(arrays.y_test[:n])
    print(f"The first {n} test images of {config.data.name}.")
    print("\n| pairs | rows | dCor: mean | min | max |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for rows in (int(s) for s in _SIZES.value):
        values = [
            _dcor(x[:rows], x[:rows][rng.permutation(rows)])
            for _ in range(_SHUFFLES.value)
        ]
        print(
            f"| the images in a random order | {rows} | {np.mean(values):.3f} | "
            f"{min(values):.3f} | {max(values):.3f} |"
        )
    one_hot = np.eye(int(arrays.num_classes), dtype="float32")[y]
    print(f"| one-hot labels | {n} | {_dcor(x, one_hot):.3f} | | |")
    if not _WORKDIRS.value:
        return
    print("\n| run | leakage_dcor | non-zero cut entries |")
    print("|---|---|---|")
    for workdir in _WORKDIRS.value:
        run = read_config(workdir)
        segment = restore_client_segment(run, workdir, builders.load_data(run))
        cut = flat(segment(x, training=False))
        nonzero = np.mean([np.mean(np.asarray(c) != 0) for c in cut])
        print(f"| {workdir} | {_dcor(x, cut):.3f} | {nonzero:.3f} |")


if __name__ == "__main__":
    app.run(main)
