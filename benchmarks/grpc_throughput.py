"""Steps/s over gRPC on loopback vs in-process, and bytes and steps/s per codec.

For each case (model:batch) and each thread setting T (`--threads`: intra-op
threads per process, `config.runtime.intra_op_threads`; 0 = TensorFlow's
default, one per core) a process of its own holds, on the same in-memory
batch: the in-process program (the round-robin schedule's compiled step:
client, LocalTransport and server in one graph, synchronous) and a client
over gRPC to one server process (`splitkeras serve`, also with T threads) per
setting M:S (M micro-batches per step, up to S steps in flight:
`config.train.microbatches`, `max_staleness`). Runs are interleaved across
all of them, run by run; the table gives median steps/s and the ratio to the
fastest in-process median, with the CPU time each process spent per step
(the client's: its worker process, which runs nothing else meanwhile; the
server's: from /proc). Raw gRPC round trips of the cut's bytes (no
TensorFlow, both ends in this process) give the transport's own cost, as
unary calls (what the library sends) and as one bidirectional stream, each
synchronous and with 2 more messages in flight.
Then, for LeNet, one server per codec (activations and gradients): steps/s
and bytes per step as counted on the wire (serialized messages + gRPC
framing), with the ratio to float32.

  python benchmarks/grpc_throughput.py                 # LeNet/64, VGG-16/128, codecs
  python benchmarks/grpc_throughput.py --cases=lenet5:64 --settings=1:0,1:2 --codecs=
  python benchmarks/grpc_throughput.py --settings= --codecs=   # round trips only
"""

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import grpc_steps
from absl import app, flags

_CASES = flags.DEFINE_list("cases", ["lenet5:64", "vgg16:128"], "model:batch pairs.")
_SETTINGS = flags.DEFINE_list(
    "settings",
    ["1:0", "4:0", "1:1", "1:2"],
    "M:S (micro-batches : staleness); empty: only the raw round trips.",
)
_THREADS = flags.DEFINE_list(
    "threads",
    ["0", "1"],
    "Intra-op threads per process to compare (0: TensorFlow's default); "
    "each gets a client process and servers of its own.",
)
_CODECS = flags.DEFINE_list(
    "codecs",
    ["float32", "float16", "bfloat16", "int8", "int8_channel", "topk:0.1"],
    "Codecs (both directions) to compare (LeNet/64); empty: skip.",
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per way (median taken).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per run; 0 = 100 LeNet, 5 VGG.")
_WORKER = flags.DEFINE_string(
    "worker", "", "Internal: ROOT,MODEL:BATCH,THREADS: one thread setting's runs."
)

_MARK = "@@ "  # a worker's answers on stdout (TensorFlow may print there too)


def _cpu_seconds(pid=None) -> float:
    """User + system CPU seconds of this process, or of process `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(spec, settings):
    """One thread setting: its in-process program and a gRPC client per M:S;
    answers `[way, steps]` lines on stdin with [steps/s, CPU seconds per
    step of this process, of the way's server process (in-process: 0)]."""
    from splitkeras import cli

    root, case, threads = spec.split(",")
    name, batch = case.split(":")
    config, _ = grpc_steps.setup(root, name, int(batch), threads=int(threads))
    cli.use_threads(config)  # before TensorFlow's first op
    programs = {"in-process": grpc_steps.local_program(config)}
    servers = {}  # way -> its server process's pid
    remotes = []
    try:
        for setting in settings:
            m, s = (int(v) for v in setting.split(":"))
            config, args = grpc_steps.setup(
                root, name, int(batch), "float32", m, s, int(threads)
            )
            tag = f"{name}_{batch}_{m}_{s}_t{threads}"
            remotes.append(grpc_steps.Remote(root, tag, config, args))
            programs[f"grpc M={m} S={s}"] = remotes[-1].program
            servers[f"grpc M={m} S={s}"] = remotes[-1].server.pid
        xy = grpc_steps.first_batch(config)
        for program in programs.values():
            grpc_steps.rate(program, xy, 2)  # trace and warm up
        print(_MARK + json.dumps(list(programs)), flush=True)
        for line in sys.stdin:
            way, steps = json.loads(line)
            pid = servers.get(way)
            mine, theirs = _cpu_seconds(), _cpu_seconds(pid) if pid else 0.0
            rate = grpc_steps.rate(programs[way], xy, steps)
            mine = (_cpu_seconds() - mine) / steps
            theirs = (_cpu_seconds(pid) - theirs) / steps if pid else 0.0
            print(_MARK + json.dumps([rate, mine, theirs]), flush=True)
    finally:
        for remote in remotes:
            remote.close()


class Worker:
    """A `worker` process, asked for runs one at a time."""

    def __init__(self, root, case, threads, settings):
        self.process = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                f"--worker={root},{case},{threads}",
                f"--settings={','.join(settings)}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def answer(self):
        for line in self.process.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK) :])
        raise RuntimeError(f"worker ended: exit {self.process.wait()}")

    def rate(self, way, steps) -> list:
        self.process.stdin.write(json.dumps([way, steps]) + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def compare(root, case, settings, threads, runs, steps):
    """{(threads, way): [median steps/s, median client and server CPU
    seconds per step]}, interleaved run by run."""
    workers = {t: Worker(root, case, t, settings) for t in threads}
    try:
        ways = {t: w.answer() for t, w in workers.items()}  # all ready
        rates = {(t, way): [] for t in threads for way in ways[t]}
        for _ in range(runs):
            for t, w in workers.items():
                for way in ways[t]:
                    rates[(t, way)].append(w.rate(way, steps))
    finally:
        for w in workers.values():
            w.close()
    return {k: [statistics.median(c) for c in zip(*v)] for k, v in rates.items()}


def echo(nbytes, runs=7, calls=50):
    """{way: (wall ms, CPU ms) per message}, medians, of raw gRPC round trips
    sending `nbytes` and answering them (channel options as the library's,
    both ends here): unary calls and one bidirectional stream, each waiting
    for every reply (synchronous) or with 2 more messages in flight."""
    import concurrent.futures
    import queue

    import grpc

    from splitkeras.transport.grpc_client import channel_options

    options = channel_options(max(nbytes + (1 << 20), 4 << 20))
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8), options=options)

    def answer_each(requests, context):
        yield from requests

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "Echo",
                {
                    "Call": grpc.unary_unary_rpc_method_handler(
                        lambda data, context: data
                    ),
                    "Stream": grpc.stream_stream_rpc_method_handler(answer_each),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    call = channel.unary_unary("/Echo/Call")
    outbox = queue.Queue()
    replies = channel.stream_stream("/Echo/Stream")(iter(outbox.get, None))
    try:
        return _echo_ways(call, outbox, replies, os.urandom(nbytes), runs, calls)
    finally:
        outbox.put(None)  # ends the stream
        channel.close()
        server.stop(None)


def _echo_ways(call, outbox, replies, data, runs, calls) -> dict:
    """`echo`'s measurements on a connected unary call and stream."""

    def unary(n, ahead):
        pending = []
        for _ in range(n):
            if not ahead:
                call(data)
                continue
            pending.append(call.future(data))
            if len(pending) > ahead:
                pending.pop(0).result()
        for future in pending:
            future.result()

    def stream(n, ahead):
        sent = received = 0
        while received < n:
            while sent < n and sent - received <= ahead:
                outbox.put(data)
                sent += 1
            next(replies)
            received += 1

    ways = {
        "unary": lambda n: unary(n, 0),
        "unary, 2 in flight": lambda n: unary(n, 2),
        "stream": lambda n: stream(n, 0),
        "stream, 2 in flight": lambda n: stream(n, 2),
    }
    for way in ways.values():
        way(5)  # connected and warm
    walls = {way: [] for way in ways}
    cpus = {way: [] for way in ways}
    for _ in range(runs):  # interleaved, run by run
        for name, way in ways.items():
            cpu0, start = _cpu_seconds(), time.perf_counter()
            way(calls)
            walls[name].append((time.perf_counter() - start) / calls * 1000)
            cpus[name].append((_cpu_seconds() - cpu0) / calls * 1000)
    return {
        way: (statistics.median(walls[way]), statistics.median(cpus[way]))
        for way in ways
    }


def cut_bytes(name, batch) -> int:
    """Bytes of one step's float32 cut tensor at the case's default cut."""
    from splitkeras import models

    model = models.build_model(name, grpc_steps.SHAPES[name], 10)
    shape = model.get_layer(models.default_cut(name)).output.shape[1:]
    return 4 * batch * math.prod(shape)


def codecs(root, codec_names, runs, steps):
    rows = []
    for codec in codec_names:
        config, args = grpc_steps.setup(root, "lenet5", 64, codec)
        remote = grpc_steps.Remote(root, f"codec_{codec}", config, args)
        xy = grpc_steps.first_batch(config)
        try:
            grpc_steps.rate(remote.program, xy, 2)
            conn = remote.connection
            sent, received = conn.bytes_sent, conn.bytes_received
            rates = [grpc_steps.rate(remote.program, xy, steps) for _ in range(runs)]
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


def print_steps(name, batch, medians) -> None:
    base = max(v[0] for (_, way), v in medians.items() if way == "in-process")
    for (threads, way), (value, client, server) in medians.items():
        label = threads if threads != "0" else "default"
        server = f"{1000 * server:.2f}" if way != "in-process" else "-"
        print(
            f"| {name}/{batch} | {label} | {way} | {value:.2f} | {value / base:.3f} "
            f"| {1000 * client:.2f} | {server} |"
        )


def main(argv):
    del argv
    if _WORKER.value:
        worker(_WORKER.value, _SETTINGS.value)
        return
    root = tempfile.mkdtemp(prefix="grpc_bench_")
    floors = []
    if _SETTINGS.value:
        print(
            "| case | threads | way | steps/s (median) | / best in-process "
            "| CPU ms / step: client (in-process: all) | server |"
        )
        print("|---|---|---|---|---|---|---|")
    for case in _CASES.value:
        name, batch = case.split(":")
        if _SETTINGS.value:
            steps = _STEPS.value or (100 if name == "lenet5" else 5)
            medians = compare(
                root, case, _SETTINGS.value, _THREADS.value, _RUNS.value, steps
            )
            print_steps(name, batch, medians)
        nbytes = cut_bytes(name, int(batch))
        calls = 50 if nbytes < (1 << 20) else 5
        floors.append((case, nbytes, echo(nbytes, calls=calls)))
    print()
    print(
        "| case | cut bytes each way | raw gRPC round trip | wall ms / message "
        "| CPU ms / message |"
    )
    print("|---|---|---|---|---|")
    for case, nbytes, ways in floors:
        for way, (wall, cpu) in ways.items():
            print(f"| {case} | {nbytes:,} | {way} | {wall:.2f} | {cpu:.2f} |")
    codec_names = [c for c in _CODECS.value if c]
    if codec_names:
        rows = codecs(root, codec_names, _RUNS.value, _STEPS.value or 100)
        base = dict((r[0], r[1]) for r in rows).get("float32")
        print()
        print(
            "| codec (LeNet/64, both ways) | bytes up / step | ratio to float32 "
            "| bytes down / step | gRPC steps/s |"
        )
        print("|---|---|---|---|---|")
        for codec, up, down, rate in rows:
            ratio = f"{up / base:.3f}" if base else "-"
            print(f"| {codec} | {up:,.0f} | {ratio} | {down:,.0f} | {rate:.1f} |")


if __name__ == "__main__":
    app.run(main)
