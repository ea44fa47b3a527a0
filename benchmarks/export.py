"""Exported client segments: sizes, output differences and latencies.

For each model's client segment (untrained weights, the zoo's default cut
unless given): the size of every artifact `splitkeras.export` writes, its
largest output difference from Keras on a batch of uniform noise, and
median latencies, all variants timed in turn within each round:

- inference (`serve`, batch 1 and --batch): Keras (compiled tf.function),
  the SavedModel's serve signature, LiteRT float32 / float16 / int8;
- one on-device training step (batch --batch): Keras (forward under a tape,
  gradients of the cut tensors, optimizer update; compiled), the
  SavedModel's forward + backward, LiteRT forward + backward.

  python benchmarks/export.py [--models=lenet5,vgg16,resnet18,alexnet] \
      [--rounds=7] [--batch=32] [--threads=2] [--out=benchmarks/export.json]
"""

import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from splitkeras.cut import cut  # noqa: E402
from splitkeras.edge.runtime import LiteSegment  # noqa: E402
from splitkeras.export import export_segment  # noqa: E402
from splitkeras.models.registry import build_model, default_cut  # noqa: E402

_MODELS = flags.DEFINE_list(
    "models", ["lenet5", "vgg16", "resnet18", "alexnet"], "Zoo models."
)
_CUTS = flags.DEFINE_list("cuts", [], "model=layer overrides of the default cut.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timing rounds (median reported).")
_BATCH = flags.DEFINE_integer("batch", 32, "Training / batched inference size.")
_THREADS = flags.DEFINE_integer("threads", 2, "LiteRT interpreter threads.")
_OUT = flags.DEFINE_string("out", None, "Write the results (JSON) here.")

SHAPES = {
    "lenet5": (28, 28, 1),
    "vgg16": (32, 32, 3),
    "resnet18": (32, 32, 3),
    "alexnet": (224, 224, 3),
}
LITE = ("client.tflite", "client_serve_float16.tflite", "client_serve_int8.tflite")


def _median_ms(fn, rounds, repeats):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - started) / repeats * 1e3)
    return times


def _bench(name, layer, rounds, batch, threads):
    shape = SHAPES[name]
    model = build_model(name, input_shape=shape)
    segment = cut(model, layer).client
    optimizer = keras.optimizers.Adam(1e-3)
    out = tempfile.mkdtemp(prefix=f"export_{name}_")
    rng = np.random.default_rng(0)
    x1 = rng.uniform(size=(1, *shape)).astype(np.float32)
    xb = rng.uniform(size=(batch, *shape)).astype(np.float32)
    report = export_segment(segment, optimizer, out, sample=xb[:8])
    loaded = tf.saved_model.load(os.path.join(out, "saved_model"))
    lites = {n: LiteSegment(os.path.join(out, n), threads) for n in LITE}
    grads = [
        rng.normal(size=(batch, *t.shape[1:])).astype(np.float32)
        for t in segment.outputs
    ]

    keras_serve = tf.function(lambda x: segment(x, training=False))

    @tf.function
    def keras_step(x, g):
        with tf.GradientTape() as tape:
            cuts = tf.nest.flatten(segment(x, training=True))
        variables = segment.trainable_variables
        optimizer.apply_gradients(
            zip(tape.gradient(cuts, variables, output_gradients=g), variables)
        )

    saved = loaded.signatures
    feeds = {f"grad_{i}": tf.constant(g) for i, g in enumerate(grads)}

    def saved_step():
        saved["forward"](x=tf.constant(xb))
        saved["backward"](x=tf.constant(xb), **feeds)

    def lite_step():
        lites["client.tflite"].forward(xb)
        lites["client.tflite"].backward(xb, grads)

    variants = {}
    for size, x in (("1", x1), (str(batch), xb)):
        variants[f"serve_b{size}/keras"] = lambda x=x: keras_serve(x).numpy()
        variants[f"serve_b{size}/saved_model"] = lambda x=x: saved["serve"](
            x=tf.constant(x)
        )
        for n, lite in lites.items():
            variants[f"serve_b{size}/{n}"] = lambda x=x, lite=lite: lite.serve(x)
    variants[f"train_b{batch}/keras"] = lambda: keras_step(
        tf.constant(xb), [tf.constant(g) for g in grads]
    )
    variants[f"train_b{batch}/saved_model"] = saved_step
    variants[f"train_b{batch}/client.tflite"] = lite_step
    for fn in variants.values():  # warm up (tracing, interpreter allocation)
        fn()
        fn()
    samples = {k: [] for k in variants}
    for _ in range(rounds):  # interleaved: every variant once per round
        for key, fn in variants.items():
            samples[key] += _median_ms(fn, 1, 3 if "train" in key else 10)
    latency = {k: float(np.median(v)) for k, v in samples.items()}
    return {
        "model": name,
        "cut": layer,
        "input_shape": list(shape),
        "parameters": report["parameters"],
        "artifacts": report["artifacts"],
        "latency_ms": latency,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    cuts = dict(item.split("=", 1) for item in _CUTS.value)
    results = []
    for name in _MODELS.value:
        layer = cuts.get(name, default_cut(name))
        result = _bench(name, layer, _ROUNDS.value, _BATCH.value, _THREADS.value)
        results.append(result)
        print(f"\n{name} cut at {layer} ({result['parameters']:,} parameters)")
        print(f"  {'artifact':30} {'bytes':>12} {'max |diff|':>10}")
        for artifact, a in result["artifacts"].items():
            print(f"  {artifact:30} {a['bytes']:>12,} {a['max_abs_diff']:>10.1e}")
        print(f"  {'latency (median ms)':44} ")
        for key, ms in result["latency_ms"].items():
            print(f"  {key:44} {ms:>9.3f}")
        keras.backend.clear_session()
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
