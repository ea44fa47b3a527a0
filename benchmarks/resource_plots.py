"""Accuracy vs client-side FLOPs and vs bytes, from real small runs (PNG).

Trains Fashion-MNIST / LeNet-5 with SplitNN (round-robin), FedAvg and
large-batch SGD for the same epochs and clients, reads each run's validation
accuracy and byte counters per epoch from its TensorBoard events, computes
the client FLOPs spent up to each epoch, and draws the seed's "validation
accuracy vs client-side FLOPs" figure and its bandwidth counterpart: one
PNG per client count (`--out` with `_<K>clients` before its extension when
several are given), and a markdown table of the last epoch of every run
with its wall time (`--table`).

  python benchmarks/resource_plots.py --epochs=5 --clients=5 \
      --out=benchmarks/resource_plots.png
  python benchmarks/resource_plots.py --epochs=5 --clients=100,500 \
      --out=docs/resource_plots.png --table=docs/resource_plots.md
"""

import glob
import os
import shutil
import sys
import time

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
_CLIENTS = flags.DEFINE_list("clients", ["5"], "Client counts: runs for each.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/resource_plots", "Runs.")
_OUT = flags.DEFINE_string("out", "benchmarks/resource_plots.png", "PNG file.")
_TABLE = flags.DEFINE_string("table", "", "Also write the table (markdown) here.")

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


def _run(label, method, clients):
    config = fashion_mnist_lenet.get_config()
    config.method = method
    config.num_clients = clients
    config.train.epochs = _EPOCHS.value
    workdir = os.path.join(_WORKDIR.value, f"{clients}", method)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    experiment.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    series = _validation_series(workdir)
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    a = tables.assumptions(config, arrays)
    flops_per_epoch = tables.client_flops(a, method, clients) / a.epochs
    epochs = [step for step, _ in series["accuracy"]]
    accuracy = [value for _, value in series["accuracy"]]
    total = dict(series["bytes_up"])
    down = dict(series["bytes_down"])
    megabytes = [(total[e] + down[e]) / clients / 1e6 for e in epochs]
    tflops = [e * flops_per_epoch / 1e12 for e in epochs]
    return label, accuracy, tflops, megabytes, seconds


def _plot(clients, runs, out):
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, accuracy, tflops, megabytes, _ in runs:
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
        f"Fashion-MNIST, LeNet-5 cut at pool1, {clients} clients, "
        f"{_EPOCHS.value} epochs"
    )
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv):
    del argv
    counts = [int(k) for k in _CLIENTS.value]
    rows = [
        "| clients | method | epochs | validation accuracy | client TFLOPs "
        "(per client) | MB per client | wall seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in counts:
        runs = [_run(label, method, clients) for label, method in METHODS.items()]
        out = _OUT.value
        if len(counts) > 1:
            stem, extension = os.path.splitext(out)
            out = f"{stem}_{clients}clients{extension}"
        _plot(clients, runs, out)
        for label, accuracy, tflops, megabytes, seconds in runs:
            rows.append(
                f"| {clients} | {label} | {len(accuracy)} | {accuracy[-1]:.4f} | "
                f"{tflops[-1]:.4g} | {megabytes[-1]:.1f} | {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))
    if _TABLE.value:
        with open(_TABLE.value, "w") as f:
            f.write("\n".join(rows) + "\n")
        print(f"wrote {_TABLE.value}")


if __name__ == "__main__":
    app.run(main)
