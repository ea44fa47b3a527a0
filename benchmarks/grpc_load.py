"""Load test: K client processes against one server process over gRPC.

Starts scripts/serve.py and K scripts/client.py processes on 127.0.0.1 (TLS
and per-client tokens on by default) for a bounded run on a synthetic
Fashion-MNIST-shaped dataset, then checks: every process exited 0, the server
applied exactly the expected number of steps (none lost, none twice), no call
was refused, no turn was skipped; and reports the server's peak memory.

  python benchmarks/grpc_load.py --clients=16 --epochs=2
"""

import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import launcher  # noqa: E402

_CLIENTS = flags.DEFINE_integer("clients", 16, "Client processes.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs (every client trains each).")
_PER_CLIENT = flags.DEFINE_integer("examples", 256, "Training examples per client.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_TLS = flags.DEFINE_bool("tls", True, "TLS and per-client tokens.")


def main(argv):
    del argv
    root = tempfile.mkdtemp(prefix="grpc_load_")
    k, n = _CLIENTS.value, _CLIENTS.value * _PER_CLIENT.value
    rng = np.random.default_rng(0)
    path = os.path.join(root, "data.npz")
    np.savez(
        path,
        x_train=rng.integers(0, 255, (n, 28, 28, 1), dtype=np.uint8),
        y_train=rng.integers(0, 10, n),
        x_test=rng.integers(0, 255, (256, 28, 28, 1), dtype=np.uint8),
        y_test=rng.integers(0, 10, 256),
    )
    args = [
        "--config=configs/fashion_mnist_lenet.py",
        f"--config.data.path={path}",
        f"--config.num_clients={k}",
        f"--config.train.epochs={_EPOCHS.value}",
        f"--config.train.batch_size={_BATCH.value}",
    ]
    start = time.perf_counter()
    run = launcher.launch(args, os.path.join(root, "run"), k, tls=_TLS.value)
    summary = run.wait(3600)
    seconds = time.perf_counter() - start
    expected = _EPOCHS.value * k * -(-_PER_CLIENT.value // _BATCH.value)
    clients = []
    for c in range(k):
        with open(os.path.join(root, "run", f"client_{c}", "summary.json")) as f:
            clients.append(json.load(f))
    problems = []
    if summary["steps"] != expected:
        problems.append(f"server applied {summary['steps']} steps, expected {expected}")
    if summary["refused_calls"] or summary["skipped_turns"]:
        problems.append(
            f"refused {summary['refused_calls']}, skipped {summary['skipped_turns']}"
        )
    print(
        f"clients: {k} processes, TLS+tokens: {_TLS.value}; steps applied: "
        f"{summary['steps']} (expected {expected}); refused calls: "
        f"{summary['refused_calls']}; skipped turns: {len(summary['skipped_turns'])}; "
        f"client retries: {sum(c['retries'] for c in clients)}; restarted turns: "
        f"{sum(c['restarted_turns'] for c in clients)}"
    )
    print(
        f"server peak RSS: {summary['server_max_rss_mb']:.0f} MiB; wall: "
        f"{seconds:.0f} s (processes started to last exit); bytes through the "
        f"server: {sum(summary['per_client']['bytes_up']) / 1e6:.1f} MB up, "
        f"{sum(summary['per_client']['bytes_down']) / 1e6:.1f} MB down"
    )
    print("OK" if not problems else "PROBLEMS: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    app.run(main)
