"""Split steps over a throttled link: steps/s and bytes on the wire.

The benchmark makes a network namespace of its own (`ip netns add`), shapes
its loopback with a token bucket (`tc qdisc ... tbf rate R`; `netem` is not
available on these machines) and runs, inside it, one server process per
setting and a client in a worker process (this script with --worker), all
on 127.0.0.1 of the namespace: nothing leaves the machine. Both directions
of a step share the one loopback device, so R is the rate of the uplink and
the downlink together. The namespace is removed at the end, also on errors.
Without root, `ip` or `tc` the benchmark says so and stops.

For each rate, model/batch, codec (on activations and gradients) and setting
M:S (`config.train.microbatches` M, `config.train.max_staleness` S) it
prints the median steps/s of several runs (all settings of a codec timed in
turn, run by run), the seconds an epoch would take (Fashion-MNIST's 60,000
training images for LeNet, 50,000 CIFAR-sized images for VGG), and the
bytes per step three ways: computed (the codec's wire parts and labels, as
`LocalTransport` counts them in one process), counted at the client's gRPC
connection (serialized messages + gRPC's 5-byte framing) and seen on the
namespace's loopback (`tx_bytes`: HTTP/2 framing, TCP/IP headers and acks
included).

  sudo .venv/bin/python benchmarks/link.py            # the full table
  sudo .venv/bin/python benchmarks/link.py --rates=100mbit --cases=vgg16:128 \
      --codecs=float32,int8_channel --settings=1:0,1:1
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

_RATES = flags.DEFINE_list(
    "rates", ["10mbit", "100mbit", "unshaped"], "tc rates (or 'unshaped')."
)
_CASES = flags.DEFINE_list("cases", ["lenet5:64", "vgg16:128"], "model:batch pairs.")
_SLOW_CASES = flags.DEFINE_list(
    "slow_cases", ["lenet5:64"], "The cases measured at rates below 100 Mbit/s."
)
_CODECS = flags.DEFINE_list(
    "codecs", ["float32", "float16", "int8_channel", "topk:0.1"], "Codecs."
)
_SETTINGS = flags.DEFINE_list(
    "settings", ["1:0", "4:0", "8:0", "1:1", "4:1", "8:1"], "M:S settings."
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per setting (median taken).")
_STEPS = flags.DEFINE_string(
    "steps", "lenet5=10,vgg16=2", "Steps per timed run, per model."
)
_AT_ONCE = flags.DEFINE_integer(
    "servers_at_once",
    0,
    "Settings (server processes) measured together, interleaved; 0 = all of "
    "a codec's. VGG: 2 (six VGG servers at once slowed every step ~5x here).",
)
_WORKER = flags.DEFINE_string("worker", "", "Internal: measure this rate here.")

_EPOCH_EXAMPLES = {"lenet5": 60000, "vgg16": 50000}
_MBIT = 1_000_000


def _lo_bytes() -> int:
    with open("/sys/class/net/lo/statistics/tx_bytes") as f:
        return int(f.read())


def _computed_bytes(config, batch) -> tuple:
    """(up, down) bytes of one step as the in-process transport counts them."""
    import grpc_steps

    program = grpc_steps.local_program(config)
    link = program.link
    before = (link.bytes_up[0].numpy(), link.bytes_down[0].numpy())
    grpc_steps.rate(program, batch, 1)
    return (
        int(link.bytes_up[0].numpy() - before[0]),
        int(link.bytes_down[0].numpy() - before[1]),
    )


def _measure_codec(root, rate, name, batch_size, codec, settings, runs, steps):
    """Rows (dicts) of one codec's settings, timed in turn, run by run."""
    import grpc_steps

    remotes, rows, runs_of = {}, [], {}
    for setting in settings:
        m, s = (int(v) for v in setting.split(":"))
        config, args = grpc_steps.setup(root, name, batch_size, codec, m, s)
        runs_of[(m, s)] = (f"{name}_{codec.replace(':', '')}_{m}_{s}", config, args)
    started = grpc_steps.start_servers(
        root, [(tag, args) for tag, _, args in runs_of.values()]
    )
    try:
        for (key, (tag, config, args)), server in zip(runs_of.items(), started):
            remote = grpc_steps.Remote(root, tag, config, args, started=server)
            remotes[key] = (config, remote)
        batch = grpc_steps.first_batch(config)
        computed = _computed_bytes(config, batch)
        for _, remote in remotes.values():
            grpc_steps.rate(remote.program, batch, 2)  # trace and warm up
        rates = {key: [] for key in remotes}
        for _ in range(runs):
            for key, (_, remote) in remotes.items():
                rates[key].append(grpc_steps.rate(remote.program, batch, steps))
        for (m, s), (_, remote) in remotes.items():
            connection = remote.connection
            sent, received = connection.bytes_sent, connection.bytes_received
            on_lo = _lo_bytes()
            grpc_steps.rate(remote.program, batch, steps)
            median = statistics.median(rates[(m, s)])
            rows.append(
                {
                    "rate": rate,
                    "case": f"{name}/{batch_size}",
                    "codec": codec,
                    "M": m,
                    "S": s,
                    "steps_per_s": median,
                    "runs": rates[(m, s)],
                    "epoch_s": _EPOCH_EXAMPLES[name] / batch_size / median,
                    "computed_up": computed[0],
                    "computed_down": computed[1],
                    "grpc_up": (connection.bytes_sent - sent) / steps,
                    "grpc_down": (connection.bytes_received - received) / steps,
                    "wire": (_lo_bytes() - on_lo) / steps,
                }
            )
    finally:
        for _, remote in remotes.values():
            remote.close()
        for process, _ in started[len(remotes) :]:  # started, never connected
            process.kill()
    return rows


def worker(rate):
    """Runs inside the namespace: every case, codec and setting at `rate`."""
    root = tempfile.mkdtemp(prefix="link_bench_")
    steps = dict(item.split("=") for item in _STEPS.value.split(","))
    cases = _CASES.value
    if rate != "unshaped" and _parse_rate(rate) < 100 * _MBIT:
        cases = [c for c in cases if c in _SLOW_CASES.value]
    try:
        for case in cases:
            name, batch = case.split(":")
            settings = _SETTINGS.value
            size = _AT_ONCE.value or len(settings)
            groups = [settings[i : i + size] for i in range(0, len(settings), size)]
            for codec in _CODECS.value:
                for group in groups:
                    rows = _measure_codec(
                        root,
                        rate,
                        name,
                        int(batch),
                        codec,
                        group,
                        _RUNS.value,
                        int(steps[name]),
                    )
                    for row in rows:
                        print("ROW " + json.dumps(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _parse_rate(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise ValueError(f"rate {rate!r}: use e.g. 10mbit or 100mbit")


def _run(*command, check=True):
    return subprocess.run(command, check=check, capture_output=True, text=True)


def _can_shape() -> str:
    """'' if this process may make and shape a namespace, else why not."""
    if os.geteuid() != 0:
        return "this benchmark must run as root (ip netns add, tc qdisc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (iproute2)"
    return ""


def _shape(namespace, rate) -> None:
    """Shapes the namespace's loopback to `rate` (or removes the shaping)."""
    ns = ("ip", "netns", "exec", namespace)
    _run(*ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    if rate == "unshaped":
        return
    bits = _parse_rate(rate)
    # A bucket of 5 ms at the rate (at least 3 packets of 1500 bytes) keeps
    # bursts short; packets wait up to 500 ms before they are dropped.
    burst = max(int(bits / 8 * 0.005), 4500)
    _run(*ns, "ip", "link", "set", "lo", "mtu", "1500")
    shaped = _run(
        *ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
        "burst", str(burst), "latency", "500ms", check=False,
    )  # fmt: skip
    if shaped.returncode:
        raise RuntimeError(f"tc could not shape the loopback: {shaped.stderr}")


def _table(rows) -> None:
    print(
        "| rate | case | codec | M | S | steps/s | / float32 M=1 S=0 | s / epoch "
        "| computed up+down | gRPC up+down | on the wire |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = {
        (r["rate"], r["case"]): r["steps_per_s"]
        for r in rows
        if (r["codec"], r["M"], r["S"]) == ("float32", 1, 0)
    }
    for r in rows:
        ref = base.get((r["rate"], r["case"]))
        ratio = f"{r['steps_per_s'] / ref:.2f}" if ref else "-"
        computed = r["computed_up"] + r["computed_down"]
        grpc = r["grpc_up"] + r["grpc_down"]
        print(
            f"| {r['rate']} | {r['case']} | {r['codec']} | {r['M']} | {r['S']} "
            f"| {r['steps_per_s']:.3g} | {ratio} | {r['epoch_s']:,.0f} "
            f"| {computed / 1e6:.3f} MB | {grpc / 1e6:.3f} MB "
            f"| {r['wire'] / 1e6:.3f} MB |"
        )


def main(argv):
    del argv
    if _WORKER.value:
        worker(_WORKER.value)
        return 0
    why = _can_shape()
    if why:
        print(f"link.py cannot shape a link here: {why}.", file=sys.stderr)
        return 1
    namespace = f"splitkeras-link-{os.getpid()}"
    _run("ip", "netns", "add", namespace)
    rows = []
    try:
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        for rate in _RATES.value:
            _shape(namespace, rate)
            args = [a for a in sys.argv[1:] if not a.startswith("--worker")]
            done = subprocess.run(
                ["ip", "netns", "exec", namespace, sys.executable, __file__]
                + args
                + [f"--worker={rate}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for line in done.stdout.splitlines():
                if line.startswith("ROW "):
                    rows.append(json.loads(line[4:]))
            if done.returncode:
                raise RuntimeError(f"the worker at {rate} failed")
    finally:
        _run("ip", "netns", "del", namespace, check=False)
        if rows:
            _table(rows)
            with open(os.path.join(tempfile.gettempdir(), "link.json"), "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    app.run(main)
