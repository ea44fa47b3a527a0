"""What the gRPC benchmarks share: a server process and a client holding its
turn in this process, on synthetic data of a model's input shape, and the
steps/s of a client program (synchronous, or with steps in flight).

Used by `grpc_throughput.py` (loopback) and `link.py` (a throttled link).
"""

import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import builders, launcher, models  # noqa: E402
from splitkeras import data as data_lib  # noqa: E402
from splitkeras.client_process import ClientProcess  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402

SHAPES = {"lenet5": (28, 28, 1), "vgg16": (32, 32, 3)}


def setup(root, name, batch, codec="float32", microbatches=1, staleness=0, threads=0):
    """A config (+ its command-line form) on a synthetic dataset of `name`'s
    shape; `codec` on activations and gradients; `threads`: intra-op threads
    per process (0: TensorFlow's default)."""
    shape = SHAPES[name]
    path = os.path.join(root, f"{name}_{batch}.npz")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        n = batch * 2
        partial = f"{path}.{os.getpid()}.npz"  # workers start at once: whole
        np.savez(  # files only, by a rename
            partial,
            x_train=rng.integers(0, 255, (n, *shape), dtype=np.uint8),
            y_train=rng.integers(0, 10, n),
            x_test=rng.integers(0, 255, (batch, *shape), dtype=np.uint8),
            y_test=rng.integers(0, 10, batch),
        )
        os.replace(partial, path)
    settings = {
        "data.path": path,
        "data.input_shape": ",".join(str(d) for d in shape),
        "model.name": name,
        "model.cut": models.default_cut(name),
        "num_clients": 1,
        "train.epochs": 1,
        "train.batch_size": batch,
        "transport.codec": codec,
        "train.microbatches": microbatches,
        "train.max_staleness": staleness,
        "runtime.intra_op_threads": threads,
    }
    config = fashion_mnist_lenet.get_config()
    args = ["--config=fashion_mnist_lenet"]
    for key, value in settings.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
        args.append(f"--config.{key}={value}")
    return config, args


def first_batch(config):
    arrays = data_lib.load(config.data.name, config.data.path, False)
    ds = data_lib.train_dataset(
        arrays.x_train, arrays.y_train, config.train.batch_size, 0, 0
    )
    return next(iter(ds))


def local_program(config):
    """Client 0's program in one process (client, transport, server fused)."""
    arrays = data_lib.load(config.data.name, config.data.path, False)
    return builders.build_schedule(config, arrays).programs[0]


class Remote:
    """A server process and a connected, turn-holding client in this process.

    `started`: (process, port) of a server already started (`start_servers`).
    """

    def __init__(self, root, tag, config, args, started=None):
        self.workdir = os.path.join(root, tag)
        os.makedirs(self.workdir, exist_ok=True)
        if started is None:
            started = launcher.start_host(args, self.workdir, "server")
        self.server, port = started
        self.process = ClientProcess(
            config, 0, {"server": f"127.0.0.1:{port}"}, key=os.urandom(32)
        )
        self.program = self.process.program  # the client's turns (KerasTurns)
        self.program.begin_turn(0)
        self.connection = self.process.links["server"].connection

    def close(self):
        self.process.close()
        self.server.kill()
        self.server.wait()


def start_servers(root, runs) -> list:
    """Starts a server per (tag, args) of `runs` at once (their start-up is
    mostly importing TensorFlow and tracing); returns [(process, port)]."""
    import concurrent.futures

    def start(tag, args):
        workdir = os.path.join(root, tag)
        os.makedirs(workdir, exist_ok=True)
        return launcher.start_host(args, workdir, "server")

    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda run: start(*run), runs))


def rate(program, batch, steps) -> float:
    """Steps/s of `steps` training steps of `program` on `batch`, with up
    to `program.max_staleness` steps in flight (all received at the end)."""
    x, y = batch
    ahead = getattr(program, "max_staleness", 0)
    start = time.perf_counter()
    if not ahead:
        for _ in range(steps):
            loss = program.train_fn(x, y)
    else:
        waiting = collections.deque()
        for _ in range(steps):
            waiting.append(program.send_fn(x, y))
            if len(waiting) > ahead:
                loss = program.finish_fn(x, waiting.popleft())
        while waiting:
            loss = program.finish_fn(x, waiting.popleft())
    float(loss)  # wait for the last step
    return steps / (time.perf_counter() - start)
