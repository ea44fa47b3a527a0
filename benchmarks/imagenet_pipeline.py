"""Images/s of the ImageNet training input pipeline on this machine's CPU.

Encodes a few hundred synthetic JPEGs of ImageNet's size (heights and widths
drawn in [300, 500], quality 90, smooth random content plus noise) in memory,
then times, interleaved run by run, `tf.data` pipelines over them that repeat
the files up to --images examples and batch them (AUTOTUNE parallelism,
prefetch):

- `decode only`: the whole JPEG decoded, nothing else (the baseline);
- `train`: `splitkeras.data.imagenet.train_batches`, the training
  preprocessing of `train_dataset` (random-resized crop decoded with
  `decode_and_crop_jpeg`, resize, flip, normalize), deterministic order as
  with a seed;
- `train, any order`: the same with `deterministic=False` (seed=None);
- `train, 1 thread`: the same on a private tf.data pool of one thread: what
  one CPU core sustains.

It prints the median images/s of each, then what the measured rates mean for
N clients of 128-image batches feeding one server: in the round-robin
schedule one client trains at a time, so the server sees one client's rate;
in SplitFed all N feed it at once. --server_images_per_second is the rate a
server could consume (not measured here; the default 2000 is an example of
an AlexNet server segment on one GPU).

  python benchmarks/imagenet_pipeline.py                # 5 runs of 2560 images
  python benchmarks/imagenet_pipeline.py --runs=3 --images=1280
"""

import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras.data import imagenet  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per pipeline (median taken).")
_IMAGES = flags.DEFINE_integer("images", 2560, "Images per timed run.")
_FILES = flags.DEFINE_integer("files", 256, "Distinct synthetic JPEGs.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per batch (per client).")
_SIZE = flags.DEFINE_integer("image_size", 224, "Output height and width.")
_SERVER = flags.DEFINE_float(
    "server_images_per_second",
    2000.0,
    "Images/s the server could consume; an example figure, not measured.",
)
_CLIENTS = (1, 10, 100)


def _synthetic_jpegs(count, rng):
    """JPEGs of random ImageNet-like sizes: smooth colour fields plus noise."""
    jpegs = []
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(300, 501, 2))
        coarse = rng.random((height // 16 + 2, width // 16 + 2, 3)) * 255
        smooth = tf.image.resize(coarse, [height, width], method="bicubic")
        pixels = smooth.numpy() + rng.normal(0, 16, (height, width, 3))
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        jpegs.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
    return jpegs


def _pipelines(jpegs, num_images, batch_size, image_size):
    labels = np.arange(len(jpegs)) % 1000
    examples = tf.data.Dataset.from_tensor_slices((jpegs, labels))
    examples = examples.repeat().take(num_images)

    def decode(image_bytes, label):
        # One pixel out, so that batching costs nothing; the whole JPEG is
        # still decoded.
        return tf.io.decode_jpeg(image_bytes, channels=3)[0, 0], label

    decoded = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    decoded = decoded.batch(batch_size, drop_remainder=True)
    train = imagenet.train_batches(examples, batch_size, image_size=image_size)
    return {
        "decode only": _with_options(decoded.prefetch(tf.data.AUTOTUNE)),
        "train": _with_options(train),
        "train, any order": _with_options(train, deterministic=False),
        "train, 1 thread": _with_options(train, threads=1),
    }


def _with_options(dataset, deterministic=True, threads=0):
    options = tf.data.Options()
    options.deterministic = deterministic
    if threads:
        options.threading.private_threadpool_size = threads
    return dataset.with_options(options)


def _images_per_second(dataset, batch_size):
    start = time.perf_counter()
    batches = sum(1 for _ in dataset)
    return batches * batch_size / (time.perf_counter() - start)


def _measure(pipelines, batch_size, runs):
    for dataset in pipelines.values():
        for _ in dataset.take(2):  # Trace and start the thread pools.
            pass
    rates = {key: [] for key in pipelines}
    for _ in range(runs):
        for key, dataset in pipelines.items():
            rates[key].append(_images_per_second(dataset, batch_size))
    return {key: statistics.median(values) for key, values in rates.items()}


def _print_schedules(one_client, one_core, batch_size, server):
    print(
        f"\none client = this machine ({one_client:.0f} images/s, one "
        f"{batch_size}-image batch every {1000 * batch_size / one_client:.0f} "
        f"ms); one core = {one_core:.0f} images/s; example server rate "
        f"S = {server:.0f} images/s (not measured)"
    )
    print(
        "| clients | round-robin: images/s reaching the server | SplitFed: "
        "images/s reaching the server | round-robin: cores per client to "
        "feed S | SplitFed: cores per client to feed S |"
    )
    print("|---|---|---|---|---|")
    for n in _CLIENTS:
        print(
            f"| {n} | {one_client:.0f} | {n * one_client:.0f} | "
            f"{server / one_core:.2f} | {server / (n * one_core):.2f} |"
        )


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    jpegs = _synthetic_jpegs(_FILES.value, rng)
    shapes = [tf.image.extract_jpeg_shape(j).numpy() for j in jpegs]
    print(
        f"{len(jpegs)} synthetic JPEGs in {time.perf_counter() - start:.0f} s: "
        f"mean {np.mean([s[0] for s in shapes]):.0f} x "
        f"{np.mean([s[1] for s in shapes]):.0f} pixels, "
        f"{np.mean([len(j) for j in jpegs]) / 1000:.0f} kB"
    )
    batch = _BATCH.value
    num_images = _IMAGES.value // batch * batch
    pipelines = _pipelines(jpegs, num_images, batch, _SIZE.value)
    load_before = os.getloadavg()[0]
    medians = _measure(pipelines, batch, _RUNS.value)
    cores = len(os.sched_getaffinity(0))
    print(
        f"\nmedian of {_RUNS.value} runs of {num_images} images, batch {batch}, "
        f"{_SIZE.value}x{_SIZE.value}, {cores} cores (1-minute load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after); images/s"
    )
    print("| pipeline | images/s | vs decode only |")
    print("|---|---|---|")
    for key, rate in medians.items():
        print(f"| {key} | {rate:.0f} | {rate / medians['decode only']:.2f} |")
    _print_schedules(medians["train"], medians["train, 1 thread"], batch, _SERVER.value)


if __name__ == "__main__":
    app.run(main)
