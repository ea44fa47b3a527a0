"""Load test: K client processes against one server process over gRPC, while
unknown callers flood it with Join calls and stalled connections hang on it.

Starts `splitkeras serve` and K `splitkeras client` processes on 127.0.0.1 (TLS
and per-client tokens on by default; the server hands the clients' sealed
states on, since a client's peer inbox serves no TLS) for a bounded run on a
synthetic Fashion-MNIST-shaped dataset. While the clients train:

- `--flood` Join calls from an unknown client id and from a known id with a
  wrong token, one after the other from this process: each must be refused
  with UNAUTHENTICATED; their rate and median latency are reported;
- `--stalled` TCP connections that send part of a request and then nothing
  (a slowloris): the run must still finish.

Then it checks: every process exited 0, the server applied exactly the
expected number of steps (none lost, none twice), no client call was
refused but the flood's, no turn was skipped; and reports the server's peak
memory, its steps/s and wall time.

  python benchmarks/grpc_load.py --clients=32 --epochs=1
"""

import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import launcher  # noqa: E402
from splitkeras.cli import set_fields  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402
from splitkeras.transport import tls  # noqa: E402
from splitkeras.transport.grpc_client import SERVICE  # noqa: E402
from splitkeras.transport.proto import wire_pb2  # noqa: E402

_CLIENTS = flags.DEFINE_integer("clients", 32, "Client processes.")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Epochs (every client trains each).")
_PER_CLIENT = flags.DEFINE_integer("examples", 128, "Training examples per client.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_TLS = flags.DEFINE_bool("tls", True, "TLS and per-client tokens.")
_FLOOD = flags.DEFINE_integer("flood", 2000, "Join calls from unknown callers.")
_STALLED = flags.DEFINE_integer("stalled", 8, "Connections that stall mid-request.")


def _config(path, k):
    overrides = {
        "data.path": path,
        "num_clients": k,
        "train.epochs": _EPOCHS.value,
        "train.batch_size": _BATCH.value,
        "weight_handoff": "server",
    }
    config = fashion_mnist_lenet.get_config()
    flags = set_fields(config, overrides)
    return config, ["--config=fashion_mnist_lenet", *flags]


def _server_port(workdir, deadline=600):
    path = os.path.join(workdir, "server.port")
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError("the server did not start")
        time.sleep(0.1)
    with open(path) as f:
        return int(f.read())


def _flood(target, credentials, calls, results):
    """Join calls from an unknown id and from client 0 with a wrong token."""
    options = [("grpc.max_receive_message_length", 1 << 20)]
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    join = channel.unary_unary(SERVICE + "Join")
    callers = [
        (("x-splitkeras-client", "1000000"), ("x-splitkeras-token", "")),
        (("x-splitkeras-client", "0"), ("x-splitkeras-token", "not-the-token")),
    ]
    latencies, codes = [], {}
    began = time.perf_counter()
    for i in range(calls):
        metadata = callers[i % 2]
        request = wire_pb2.JoinRequest(client_id=int(metadata[0][1]))
        start = time.perf_counter()
        try:
            join(request.SerializeToString(), metadata=metadata, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        latencies.append(time.perf_counter() - start)
        codes[code.name] = codes.get(code.name, 0) + 1
    results.update(
        seconds=time.perf_counter() - began,
        codes=codes,
        median_ms=1e3 * statistics.median(latencies),
    )
    channel.close()


def _stall(port, count):
    """Connections that send the start of an HTTP/2 request, then nothing."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[:20])
        sockets.append(s)
    return sockets


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
    config, args = _config(path, k)
    workdir = os.path.join(root, "run")
    start = time.perf_counter()
    run = launcher.launch(args, workdir, config, tls=_TLS.value)
    port = _server_port(workdir)
    stalled = _stall(port, _STALLED.value)
    credentials = (
        tls.channel_credentials(os.path.join(workdir, "credentials"))
        if _TLS.value
        else None
    )
    flood = {}
    flooding = threading.Thread(
        target=_flood, args=(f"127.0.0.1:{port}", credentials, _FLOOD.value, flood)
    )
    flooding.start()
    summary = run.wait(3600)
    seconds = time.perf_counter() - start
    flooding.join()
    closed = 0
    for s in stalled:
        s.settimeout(0.1)
        try:
            closed += s.recv(1) == b""
        except OSError:
            closed += 1
        s.close()
    expected = _EPOCHS.value * k * -(-_PER_CLIENT.value // _BATCH.value)
    clients = []
    for c in range(k):
        with open(os.path.join(workdir, f"client_{c}", "summary.json")) as f:
            clients.append(json.load(f))
    problems = []
    if summary["steps"] != expected:
        problems.append(f"server applied {summary['steps']} steps, expected {expected}")
    if summary["refused_calls"] != _FLOOD.value or summary["skipped_turns"]:
        problems.append(
            f"refused {summary['refused_calls']} calls (the flood's: "
            f"{_FLOOD.value}), skipped {summary['skipped_turns']}"
        )
    if flood["codes"] != {"UNAUTHENTICATED": _FLOOD.value}:
        problems.append(f"flood answered {flood['codes']}")
    if closed != len(stalled):
        problems.append(f"{len(stalled) - closed} stalled connections still open")
    retries = sum(c.get("retries", 0) for c in clients)
    if retries:
        problems.append(f"the clients retried {retries} calls")
    print(
        f"clients: {k} processes, TLS+tokens: {_TLS.value}; steps applied: "
        f"{summary['steps']} (expected {expected}); refused calls: "
        f"{summary['refused_calls']}; skipped turns: {len(summary['skipped_turns'])}; "
        f"client retries: {sum(c['retries'] for c in clients)}; restarted turns: "
        f"{sum(c['restarted_turns'] for c in clients)}"
    )
    print(
        f"flood: {_FLOOD.value} Join calls (unknown id / wrong token) answered "
        f"{flood['codes']} in {flood['seconds']:.1f} s: "
        f"{_FLOOD.value / flood['seconds']:.0f} calls/s, median "
        f"{flood['median_ms']:.2f} ms; stalled connections: {len(stalled)}, "
        f"{closed} closed by the server by the run's end"
    )
    print(
        f"server peak RSS: {summary['server_max_rss_mb']:.0f} MiB; server "
        f"wall {summary['wall_seconds']:.1f} s for {summary['steps']} steps "
        f"({summary['steps'] / summary['wall_seconds']:.1f} steps/s, the clients' "
        f"starts included); wall: {seconds:.0f} s (processes started to last "
        f"exit); bytes through the server: "
        f"{sum(summary['per_client']['bytes_up']) / 1e6:.1f} MB up, "
        f"{sum(summary['per_client']['bytes_down']) / 1e6:.1f} MB down"
    )
    print("OK" if not problems else "PROBLEMS: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    app.run(main)
