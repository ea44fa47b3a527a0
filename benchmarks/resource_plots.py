"""Accuracy vs client-side FLOPs and vs bytes, from real small runs (PNG).

Trains Fashion-MNIST / LeNet-5 with SplitNN (round-robin), FedAvg and
large-batch SGD for the same epochs and clients, reads each run's validation
accuracy and byte counters per epoch from its TensorBoard events, computes
the client FLOPs spent up to each epoch, and draws the seed's "validation
accuracy vs client-side FLOPs" figure and its bandwidth counterpart.

  python benchmarks/resource_plots.py --epochs=5 --clients=5 \
      --out=benchmarks/resource_plots.png
"""

import glob
import os
import shutil
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import data as data_lib  # noqa: E402
from splitkeras import experiment  # noqa: E402
from splitkeras.accounting import tables  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402

_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs (rounds) per run.")
_CLIENTS = flags.DEFINE_integer("clients", 5, "Clients per run.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/resource_plots", "Runs.")
_OUT = flags.DEFINE_string("out", "benchmarks/resource_plots.png", "PNG file.")

METHODS = {"SplitNN": "split", "FedAvg": "fedavg", "large-batch SGD": "large_batch_sgd"}


def _validation_series(workdir):
    """{tag: [(step, value), ...]} from the run's validation events."""
    series = {}
    for path in glob.glob(os.path.join(workdir, "validation", "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                series.setdefault(value.tag, []).append((event.step, number))
    return {tag: sorted(points) for tag, points in series.items()}


def _run(label, method):
    config = fashion_mnist_lenet.get_config()
    config.method = method
    config.num_clients = _CLIENTS.value
    config.train.epochs = _EPOCHS.value
    workdir = os.path.join(_WORKDIR.value, method)
    shutil.rmtree(workdir, ignore_errors=True)
    experiment.train_and_evaluate(config, workdir)
    series = _validation_series(workdir)
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    a = tables.assumptions(config, arrays)
    flops_per_epoch = tables.client_flops(a, method, _CLIENTS.value) / a.epochs
    epochs = [step for step, _ in series["accuracy"]]
    accuracy = [value for _, value in series["accuracy"]]
    total = dict(series["bytes_up"])
    down = dict(series["bytes_down"])
    megabytes = [(total[e] + down[e]) / _CLIENTS.value / 1e6 for e in epochs]
    tflops = [e * flops_per_epoch / 1e12 for e in epochs]
    return label, accuracy, tflops, megabytes


def main(argv):
    del argv
    runs = [_run(label, method) for label, method in METHODS.items()]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, accuracy, tflops, megabytes in runs:
        left.plot(tflops, accuracy, marker="o", label=label)
        right.plot(megabytes, accuracy, marker="o", label=label)
    left.set_xscale("log")
    right.set_xscale("log")
    left.set_xlabel("client-side training TFLOPs (per client)")
    right.set_xlabel("MB sent + received per client (measured)")
    for axis in (left, right):
        # Minor log ticks unlabelled: their labels overlap on short ranges.
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_ylabel("validation accuracy")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"Fashion-MNIST, LeNet-5 cut at pool1, {_CLIENTS.value} clients, "
        f"{_EPOCHS.value} epochs"
    )
    figure.tight_layout()
    figure.savefig(_OUT.value, dpi=120)
    for label, accuracy, tflops, megabytes in runs:
        print(
            f"{label}: accuracy {accuracy[-1]:.4f}, client TFLOPs {tflops[-1]:.4g}, "
            f"MB per client {megabytes[-1]:.1f}"
        )
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
