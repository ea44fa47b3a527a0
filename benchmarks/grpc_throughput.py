"""Steps/s over gRPC on loopback vs in-process, and bytes and steps/s per codec.

For each case (model:batch) one server process (`splitkeras serve`) per
setting serves one client; this process trains the same client segment on
the same in-memory batch, interleaved run by run: in-process (the round-robin
schedule's compiled step: client, LocalTransport and server in one graph,
synchronous) and over gRPC with each setting M:S (M micro-batches per step,
up to S steps in flight: `config.train.microbatches`, `max_staleness`). It
prints median steps/s and the gRPC / in-process ratio. Then, for LeNet, one
server per codec (activations and gradients): steps/s and bytes per step as
counted on the wire (serialized messages + gRPC framing), with the ratio to
float32.

  python benchmarks/grpc_throughput.py                 # LeNet/64, VGG-16/128, codecs
  python benchmarks/grpc_throughput.py --cases=lenet5:64 --settings=1:0,1:1 --codecs=
"""

import statistics
import tempfile

import grpc_steps
from absl import app, flags

_CASES = flags.DEFINE_list("cases", ["lenet5:64", "vgg16:128"], "model:batch pairs.")
_SETTINGS = flags.DEFINE_list(
    "settings", ["1:0", "4:0", "1:1", "4:1"], "M:S (micro-batches : staleness)."
)
_CODECS = flags.DEFINE_list(
    "codecs",
    ["float32", "float16", "bfloat16", "int8", "int8_channel", "topk:0.1"],
    "Codecs (both directions) to compare (LeNet/64); empty: skip.",
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per way (median taken).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per run; 0 = 100 LeNet, 5 VGG.")


def compare(root, name, batch, settings, runs, steps):
    """{way: median steps/s}: in-process and gRPC with each M:S setting."""
    config, _ = grpc_steps.setup(root, name, batch)
    local = grpc_steps.local_program(config)
    xy = grpc_steps.first_batch(config)
    remotes = {}
    try:
        for setting in settings:
            m, s = (int(v) for v in setting.split(":"))
            config, args = grpc_steps.setup(root, name, batch, "float32", m, s)
            tag = f"{name}_{batch}_{m}_{s}"
            remotes[f"grpc M={m} S={s}"] = grpc_steps.Remote(root, tag, config, args)
        programs = {"in-process": local}
        programs.update({k: r.program for k, r in remotes.items()})
        for program in programs.values():
            grpc_steps.rate(program, xy, 2)  # trace and warm up
        rates = {k: [] for k in programs}
        for _ in range(runs):
            for way, program in programs.items():
                rates[way].append(grpc_steps.rate(program, xy, steps))
    finally:
        for remote in remotes.values():
            remote.close()
    return {k: statistics.median(v) for k, v in rates.items()}


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


def main(argv):
    del argv
    root = tempfile.mkdtemp(prefix="grpc_bench_")
    print("| case | way | steps/s (median) | / in-process |")
    print("|---|---|---|---|")
    for case in _CASES.value:
        name, batch = case.split(":")
        steps = _STEPS.value or (100 if name == "lenet5" else 5)
        medians = compare(root, name, int(batch), _SETTINGS.value, _RUNS.value, steps)
        base = medians["in-process"]
        for way, value in medians.items():
            print(f"| {name}/{batch} | {way} | {value:.2f} | {value / base:.3f} |")
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
