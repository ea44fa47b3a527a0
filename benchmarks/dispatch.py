"""Steps/s of a compiled step called as `Dispatched` vs as its `tf.function`.

Every compiled step of the library (`segment_step.compiled`) is called
through `Dispatched`: the concrete function of each input signature, found by
the arguments' structure, shapes and dtypes. This benchmark calls the same
compiled round-robin step (client, LocalTransport and server fused; LeNet-5,
batch 64, synthetic data) both ways in one process, interleaved run by run,
and prints the medians and their ratio.

  python benchmarks/dispatch.py          # --runs=7 --steps=300
"""

import statistics
import tempfile
import time

import grpc_steps
from absl import app, flags

_RUNS = flags.DEFINE_integer("runs", 7, "Timed runs per way (median taken).")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps per run.")
_CASE = flags.DEFINE_string("case", "lenet5:64", "model:batch.")


def main(argv):
    del argv
    name, batch = _CASE.value.split(":")
    config, _ = grpc_steps.setup(tempfile.mkdtemp(), name, int(batch))
    program = grpc_steps.local_program(config)
    x, y = grpc_steps.first_batch(config)
    ways = {
        "Dispatched": program.train_fn,
        "tf.function": program.train_fn.function,
    }
    for step in ways.values():
        for _ in range(20):  # trace and warm up
            step(x, y)
    rates = {way: [] for way in ways}
    for _ in range(_RUNS.value):
        for way, step in ways.items():
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                loss = step(x, y)
            float(loss)
            rates[way].append(_STEPS.value / (time.perf_counter() - start))
    medians = {way: statistics.median(r) for way, r in rates.items()}
    print(f"| {_CASE.value} | way | steps/s (median of {_RUNS.value}) | ratio |")
    print("|---|---|---|---|")
    for way, value in medians.items():
        ratio = value / medians["tf.function"]
        print(f"| {_CASE.value} | {way} | {value:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    app.run(main)
