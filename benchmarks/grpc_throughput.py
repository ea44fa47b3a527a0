"""Steps/s over gRPC on loopback vs in-process, and bytes and steps/s per codec.

For each case (model:batch) a server process (scripts/serve.py) serves one
client; this process trains the same client segment two ways on the same
in-memory batch, interleaved run by run: in-process (the round-robin
schedule's compiled step: client, LocalTransport and server in one graph) and
over gRPC (the same `Client.train_step` over a `GrpcLink` to the server
process). It prints median steps/s and the gRPC / in-process ratio. Then, for
LeNet, one server per activation codec: steps/s and bytes per step as counted
on the wire (serialized messages + gRPC framing), with the ratio to float32.

  python benchmarks/grpc_throughput.py                 # LeNet/64, VGG-16/128, codecs
  python benchmarks/grpc_throughput.py --cases=lenet5:64 --codecs= --runs=3
"""

import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fashion_mnist_lenet  # noqa: E402
from splitkeras import builders, launcher, models  # noqa: E402
from splitkeras import data as data_lib  # noqa: E402
from splitkeras.client_process import ClientProcess  # noqa: E402

_CASES = flags.DEFINE_list("cases", ["lenet5:64", "vgg16:128"], "model:batch pairs.")
_CODECS = flags.DEFINE_list(
    "codecs",
    ["float32", "float16", "bfloat16", "int8", "int8_channel", "topk:0.1"],
    "Activation codecs to compare (LeNet/64); empty: skip.",
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per way (median taken).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per run; 0 = 100 LeNet, 5 VGG.")
_SHAPES = {"lenet5": (28, 28, 1), "vgg16": (32, 32, 3)}


def _setup(root, name, batch, codec="float32"):
    """A config (+ its command-line form) on a synthetic dataset of `name`'s shape."""
    shape = _SHAPES[name]
    path = os.path.join(root, f"{name}.npz")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        n = batch * 2
        np.savez(
            path,
            x_train=rng.integers(0, 255, (n, *shape), dtype=np.uint8),
            y_train=rng.integers(0, 10, n),
            x_test=rng.integers(0, 255, (batch, *shape), dtype=np.uint8),
            y_test=rng.integers(0, 10, batch),
        )
    settings = {
        "data.path": path,
        "data.input_shape": ",".join(str(d) for d in shape),
        "model.name": name,
        "model.cut": models.default_cut(name),
        "num_clients": 1,
        "train.epochs": 1,
        "train.batch_size": batch,
        "transport.activation_codec": codec,
    }
    config = fashion_mnist_lenet.get_config()
    args = ["--config=configs/fashion_mnist_lenet.py"]
    for key, value in settings.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
        args.append(f"--config.{key}={value}")
    return config, args


def _timed(step, batch, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(*batch)
    float(loss)  # wait for the last step
    return steps / (time.perf_counter() - start)


class _Remote:
    """A server process and a connected, turn-holding client in this process."""

    def __init__(self, root, tag, config, args):
        self.workdir = os.path.join(root, tag)
        os.makedirs(self.workdir, exist_ok=True)
        self.server, port = launcher.start_host(args, self.workdir, "server")
        self.process = ClientProcess(
            config, 0, {"server": f"127.0.0.1:{port}"}, key=os.urandom(32)
        )
        self.client = self.process.program  # the client's turns (KerasTurns)
        self.client.begin_turn(0)
        self.connection = self.process.links["server"].connection

    def close(self):
        self.process.close()
        self.server.kill()
        self.server.wait()


def _batch(arrays, batch):
    ds = data_lib.train_dataset(arrays.x_train, arrays.y_train, batch, 0, 0)
    return next(iter(ds))


def compare(root, name, batch, runs, steps):
    config, args = _setup(root, name, batch)
    arrays = data_lib.load(config.data.name, config.data.path, False)
    schedule = builders.build_schedule(config, arrays)
    local = schedule.programs[0].train_fn
    remote = _Remote(root, f"{name}_{batch}", config, args)
    xy = _batch(arrays, batch)
    try:
        for step in (local, remote.client.train_fn):
            _timed(step, xy, 2)  # trace and warm up
        rates = {"in-process": [], "grpc": []}
        for _ in range(runs):
            rates["in-process"].append(_timed(local, xy, steps))
            rates["grpc"].append(_timed(remote.client.train_fn, xy, steps))
    finally:
        remote.close()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return medians, medians["grpc"] / medians["in-process"]


def codecs(root, codec_names, runs, steps):
    rows = []
    for codec in codec_names:
        config, args = _setup(root, "lenet5", 64, codec)
        arrays = data_lib.load(config.data.name, config.data.path, False)
        remote = _Remote(root, f"codec_{codec}", config, args)
        xy = _batch(arrays, 64)
        try:
            step = remote.client.train_fn
            _timed(step, xy, 2)
            conn = remote.connection
            sent, received = conn.bytes_sent, conn.bytes_received
            rates = [_timed(step, xy, steps) for _ in range(runs)]
            count = runs * steps
            rows.append(
                (
                    codec,
                    (conn.bytes_sent - sent) / count,
                    (conn.bytes_received - received) / count,
                    statistics.median(rates),
                )
            )
        finally:
            remote.close()
    return rows


def main(argv):
    del argv
    root = tempfile.mkdtemp(prefix="grpc_bench_")
    print("| case | in-process steps/s | gRPC steps/s | gRPC / in-process |")
    print("|---|---|---|---|")
    for case in _CASES.value:
        name, batch = case.split(":")
        steps = _STEPS.value or (100 if name == "lenet5" else 5)
        medians, ratio = compare(root, name, int(batch), _RUNS.value, steps)
        print(
            f"| {name}/{batch} | {medians['in-process']:.2f} | "
            f"{medians['grpc']:.2f} | {ratio:.3f} |"
        )
    codec_names = [c for c in _CODECS.value if c]
    if codec_names:
        rows = codecs(root, codec_names, _RUNS.value, _STEPS.value or 100)
        base = dict((r[0], r[1]) for r in rows).get("float32")
        print()
        print(
            "| activation codec (LeNet/64) | bytes up / step | ratio to float32 "
            "| bytes down / step | gRPC steps/s |"
        )
        print("|---|---|---|---|---|")
        for codec, up, down, rate in rows:
            ratio = f"{up / base:.3f}" if base else "-"
            print(f"| {codec} | {up:,.0f} | {ratio} | {down:,.0f} | {rate:.1f} |")


if __name__ == "__main__":
    app.run(main)
