"""The seed's configurations side by side on real data: one markdown table.

Every row trains LeNet-5 on Fashion-MNIST for the same number of epochs from
the same seed and initial weights, with `--clients` clients (iid shards), and
reports the test accuracy, its difference from `centralized`, and the bytes
each client sent and received (activations/gradients or model weights, and
the client-weight handoff of round-robin split learning).

  python benchmarks/configurations.py --epochs=5 --clients=5 \
      --workdir=workdirs/configurations
"""

import os
import shutil
import sys

from absl import app, flags

# Config files import `configs.base`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fashion_mnist_lenet  # noqa: E402
from splitkeras import experiment  # noqa: E402

_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs (rounds) for every row.")
_CLIENTS = flags.DEFINE_integer("clients", 5, "Clients in multi-client rows.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/configurations", "Runs go here.")
_ROWS = flags.DEFINE_list("rows", None, "Only these rows (names as in ROWS).")

# name -> config overrides
ROWS = {
    "centralized": {"method": "centralized", "num_clients": 1},
    "split round-robin: peer handoff": {"weight_handoff": "peer"},
    "split round-robin: server handoff (AES-GCM)": {"weight_handoff": "server"},
    "split U-shaped round-robin": {"topology": "ushaped", "model.cut": "pool1,fc2"},
    "splitfed_v1": {"method": "splitfed_v1"},
    "splitfed_v2": {"method": "splitfed_v2"},
    "vertical (2 clients: image halves)": {"topology": "vertical", "num_clients": 2},
    "fedavg": {"method": "fedavg"},
    "large_batch_sgd": {"method": "large_batch_sgd"},
}


def _config(overrides):
    c = fashion_mnist_lenet.get_config()
    c.train.epochs = _EPOCHS.value
    c.num_clients = _CLIENTS.value
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        setattr(c[section] if section else c, field, value)
    return c


def _mb(values) -> str:
    return f"{sum(values) / len(values) / 1e6:.1f}"


def _kb(values) -> str:
    return f"{sum(values) / len(values) / 1e3:.1f}"


def main(argv):
    del argv
    names = _ROWS.value or list(ROWS)
    results = {}
    for name in names:
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.split(" (")[0])
        workdir = os.path.join(_WORKDIR.value, slug)
        shutil.rmtree(workdir, ignore_errors=True)
        results[name] = experiment.train_and_evaluate(_config(ROWS[name]), workdir)
    base = results.get("centralized", {}).get("test_accuracy")
    print(
        f"\nFashion-MNIST, LeNet-5 (cut pool1), {_EPOCHS.value} epochs, "
        f"{_CLIENTS.value} clients (iid), Adam 1e-3, batch 64\n"
    )
    print(
        "| configuration | clients | test accuracy | vs centralized (points) | "
        "MB up / client | MB down / client | handoff or averaging kB / client | "
        "seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        per = s.get(
            "per_client", {"bytes_up": [s["bytes_up"]], "bytes_down": [s["bytes_down"]]}
        )
        handoff = per.get("handoff_bytes_sent") or per.get("aggregation_bytes_sent")
        delta = "" if base is None else f"{100 * (s['test_accuracy'] - base):+.2f}"
        print(
            f"| {name} | {s['num_clients']} | {s['test_accuracy']:.4f} | {delta} | "
            f"{_mb(per['bytes_up'])} | {_mb(per['bytes_down'])} | "
            f"{_kb(handoff) if handoff else '-'} | {s['wall_seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
