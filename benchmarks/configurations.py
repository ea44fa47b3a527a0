"""The seed's configurations side by side on real data: one markdown table.

Every row trains LeNet-5 on Fashion-MNIST for the same number of epochs from
the same seed and initial weights, with `--clients` clients (iid shards), and
reports the test accuracy, its difference from `centralized`, and the bytes
each client sent and received (activations/gradients or model weights, and
the client-weight handoff of round-robin split learning).

  python benchmarks/configurations.py --epochs=5 --clients=5 \
      --workdir=workdirs/configurations

With `--transport=grpc` every row (but centralized, which has one party)
also runs as separate processes over gRPC on 127.0.0.1, started by
`splitkeras launch`'s launcher (one process per host and per client, the hosts
reading no dataset), and the table puts the processes' accuracy, bytes and
seconds beside the in-process run's.
"""

import json
import os
import shutil
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from splitkeras import experiment  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402

_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs (rounds) for every row.")
_CLIENTS = flags.DEFINE_integer("clients", 5, "Clients in multi-client rows.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/configurations", "Runs go here.")
_ROWS = flags.DEFINE_list("rows", None, "Only these rows (names as in ROWS).")
_TRANSPORT = flags.DEFINE_enum(
    "transport",
    "in_process",
    ["in_process", "grpc"],
    "in_process: every row in one process. grpc: also as processes over "
    "gRPC, printed beside the in-process run.",
)

CONFIG = "fashion_mnist_lenet"  # the shipped config, by name
# T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot
# -> clothing 0, footwear 1, bag 2 (as splitkeras/configs/fashion_mnist_multitask.py).
COARSE_GROUPS = "0,0,0,0,0,1,0,1,2,1"

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
    "multi-hop (1 relay: cut pool1 and pool2)": {
        "topology": "multihop",
        "model.cut": "pool1,pool2",
        "num_clients": 1,
    },
    "multi-task (cut fc2: accuracy of task 0 of 2)": {
        "topology": "multitask",
        "model.cut": "fc2",
        "multitask.groups": COARSE_GROUPS,
        "num_clients": 1,
    },
}


def _settings(overrides) -> dict:
    return {
        "train.epochs": _EPOCHS.value,
        "num_clients": _CLIENTS.value,
        **overrides,
    }


def _config(overrides):
    c = fashion_mnist_lenet.get_config()
    for key, value in _settings(overrides).items():
        section, _, field = key.rpartition(".")
        node = c
        for part in section.split(".") if section else ():
            node = node[part]
        setattr(node, field, value)
    return c


def _config_args(overrides) -> list:
    """The same config as command-line flags, for every process."""
    return [f"--config={CONFIG}"] + [
        f"--config.{key}={value}" for key, value in _settings(overrides).items()
    ]


def _processes(name, config, workdir) -> dict:
    """The row as processes over gRPC: the first host's summary, with every
    client's summary and the seconds from the first process's start to the
    last one's exit."""
    from splitkeras import launcher

    began = time.perf_counter()
    summary = launcher.launch(_config_args(ROWS[name]), workdir, config).wait()
    summary["process_seconds"] = time.perf_counter() - began
    summary["clients"] = []
    for k in range(config.num_clients):
        with open(os.path.join(workdir, f"client_{k}", "summary.json")) as f:
            summary["clients"].append(json.load(f))
    return summary


def _per_client(s) -> dict:
    per = s.get("per_client")
    if per is None:
        per = {"bytes_up": [s["bytes_up"]], "bytes_down": [s["bytes_down"]]}
    if "bytes_up" not in per:  # multi-hop, multi-task: one counter per link
        per = {**per, "bytes_up": _sent(s), "bytes_down": _received(s)}
    return per


def _client_counts(s, directions) -> list:
    """Bytes per client summed over every kind a client sends (or receives):
    activations or weights, handoff, averaging, id alignment. Multi-hop: only
    the client's own hop (hop_0)."""
    total = None
    for key, values in s["per_client"].items():
        if key.startswith("hop_") and not key.startswith("hop_0/"):
            continue
        if key.rpartition("/")[2] in directions:
            total = values if total is None else [a + b for a, b in zip(total, values)]
    return total


def _sent(s) -> list:
    return _client_counts(
        s,
        (
            "bytes_up",
            "handoff_bytes_sent",
            "aggregation_bytes_sent",
            "alignment_bytes_sent",
        ),
    )


def _received(s) -> list:
    return _client_counts(
        s,
        (
            "bytes_down",
            "handoff_bytes_received",
            "aggregation_bytes_received",
            "alignment_bytes_received",
        ),
    )


def _mean(values) -> float:
    return sum(values) / len(values)


def _mb(values) -> str:
    return f"{_mean(values) / 1e6:.1f}"


def _kb(values) -> str:
    return f"{_mean(values) / 1e3:.1f}"


def _handoff(per) -> str:
    values = per.get("handoff_bytes_sent") or per.get("aggregation_bytes_sent")
    return _kb(values) if values else "-"


def _slug(name) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.split(" (")[0])


def _in_process_table(results, base):
    print(
        "| configuration | clients | test accuracy | vs centralized (points) | "
        "MB up / client | MB down / client | handoff or averaging kB / client | "
        "seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (s, _) in results.items():
        per = _per_client(s)
        delta = "" if base is None else f"{100 * (s['test_accuracy'] - base):+.2f}"
        print(
            f"| {name} | {s['num_clients']} | {s['test_accuracy']:.4f} | {delta} | "
            f"{_mb(per['bytes_up'])} | {_mb(per['bytes_down'])} | "
            f"{_handoff(per)} | {s['wall_seconds']:.0f} |",
            flush=True,
        )


def _side_by_side_table(results):
    """In-process | processes, column pairs. A client's bytes are all it
    sent or received: in one process as the transports count them, over
    gRPC as its own connections counted them (envelopes included)."""
    print(
        "| configuration | clients | test accuracy: in-process | processes | "
        "MB sent / client: in-process | processes | MB received / client: "
        "in-process | processes | seconds: in-process | processes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (s, p) in results.items():
        cells = [name, str(s["num_clients"]), f"{s['test_accuracy']:.4f}"]
        cells.append("-" if p is None else f"{p['test_accuracy']:.4f}")
        for ours, theirs in ((_sent, "bytes_sent"), (_received, "bytes_received")):
            cells.append(_mb(ours(s)) if "per_client" in s else "-")
            cells.append("-" if p is None else _mb([c[theirs] for c in p["clients"]]))
        cells.append(f"{s['wall_seconds']:.0f}")
        cells.append("-" if p is None else f"{p['process_seconds']:.0f}")
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv):
    del argv
    names = _ROWS.value or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}; rows: {list(ROWS)}")
    grpc = _TRANSPORT.value == "grpc"
    results = {}
    for name in names:
        config = _config(ROWS[name])
        workdir = os.path.join(_WORKDIR.value, _slug(name))
        shutil.rmtree(workdir, ignore_errors=True)
        in_process = experiment.train_and_evaluate(
            config, os.path.join(workdir, "in_process") if grpc else workdir
        )
        processes = None
        if grpc and config.method != "centralized":
            processes = _processes(name, config, os.path.join(workdir, "grpc"))
        results[name] = (in_process, processes)
    base = results.get("centralized", ({}, None))[0].get("test_accuracy")
    print(
        f"\nFashion-MNIST, LeNet-5 (cut pool1), {_EPOCHS.value} epochs, "
        f"{_CLIENTS.value} clients (iid), Adam 1e-3, batch 64\n"
    )
    if grpc:
        _side_by_side_table(results)
    else:
        _in_process_table(results, base)


if __name__ == "__main__":
    app.run(main)
