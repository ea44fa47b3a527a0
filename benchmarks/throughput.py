"""Steps/s of in-process split training vs the uncut model, side by side.

For each case, the uncut model and the same model cut at its default cut
layer train on the same in-memory batches, interleaved run by run, in two
ways: the compiled train step called in a loop on batches already in memory
(`step`: what the model costs), and Keras `fit` over a cached tf.data
pipeline (`fit`: what a user sees, including fit's fixed overheads). The
script prints the median steps/s of each and the split / uncut ratio.

  python benchmarks/throughput.py                      # LeNet/64 and VGG-16/128
  python benchmarks/throughput.py --runs=7 --steps=50 --cases=lenet5:64
"""

import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import splitkeras
from splitkeras import models

_CASES = flags.DEFINE_list(
    "cases", ["lenet5:64", "vgg16:128"], "model:batch_size pairs to measure."
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per model (median taken).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per run; 0 = 200 LeNet, 10 VGG.")
_SHAPES = {"lenet5": ((28, 28, 1), 10), "vgg16": ((32, 32, 3), 10)}


def _data(shape, classes, batch, steps):
    rng = np.random.default_rng(0)
    x = rng.random((batch * 4, *shape), dtype=np.float32)
    y = rng.integers(0, classes, batch * 4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    return ds.cache().repeat().take(steps).cache()


def _trainers(name):
    shape, classes = _SHAPES[name]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    uncut = models.build_model(name, input_shape=shape, num_classes=classes)
    uncut.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    keras.utils.set_random_seed(0)
    base = models.build_model(name, input_shape=shape, num_classes=classes)
    split = splitkeras.SplitModel(base, models.default_cut(name))
    split.compile("adam", "adam", loss=loss, metrics=["accuracy"])
    return {"uncut": uncut, "split": split}


def _step_loop(model, batches, steps):
    step = tf.function(model.train_step, reduce_retracing=True)
    step(batches[0])  # trace

    def run():
        start = time.perf_counter()
        for i in range(steps):
            logs = step(batches[i % len(batches)])
        float(logs["loss"])  # wait for the last step
        return steps / (time.perf_counter() - start)

    return run


def _fit_loop(model, ds, steps):
    def run():
        start = time.perf_counter()
        model.fit(ds, verbose=0)
        return steps / (time.perf_counter() - start)

    return run


def _measure(name, batch, steps, runs):
    shape, classes = _SHAPES[name]
    ds = _data(shape, classes, batch, steps)
    batches = [tuple(tf.constant(t) for t in b) for b in ds.take(4)]
    runners = {}
    for key, model in _trainers(name).items():
        model.fit(ds.take(3), verbose=0)  # build metrics and optimizers, trace fit
        runners[("step", key)] = _step_loop(model, batches, steps)
        runners[("fit", key)] = _fit_loop(model, ds, steps)
    rates = {key: [] for key in runners}
    for _ in range(runs):
        for key, run in runners.items():
            rates[key].append(run())
    return {key: statistics.median(values) for key, values in rates.items()}


def main(argv):
    del argv
    print(f"median of {_RUNS.value} runs; steps/s")
    print("| model | batch | loop | uncut | split | split / uncut |")
    print("|---|---|---|---|---|---|")
    for case in _CASES.value:
        name, batch = case.split(":")
        steps = _STEPS.value or (300 if name == "lenet5" else 10)
        med = _measure(name, int(batch), steps, _RUNS.value)
        for loop in ("step", "fit"):
            uncut, split = med[(loop, "uncut")], med[(loop, "split")]
            print(
                f"| {name} | {batch} | {loop} | {uncut:.2f} | {split:.2f} | "
                f"{split / uncut:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
