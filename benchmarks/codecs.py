"""Wire codecs on real data: bytes on the wire against test accuracy.

Every row trains LeNet-5 on Fashion-MNIST split at `pool1` (one client,
`splitkeras/configs/fashion_mnist_lenet.py`) for the same epochs from the same seed,
with one codec for the activations (client -> server) and `--gradient_codec`
for the gradients (server -> client), and reports the bytes each way (cut
tensors, plus labels up and losses down, including the evaluation traffic
after each epoch), the ratio of bytes up to the float32 row's, training
steps/s and the test accuracy against the float32 row.

  python benchmarks/codecs.py --epochs=3 --workdir=workdirs/codecs
"""

import os
import shutil
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import experiment  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402

CODECS = ["float32", "float16", "bfloat16", "int8", "int8_channel", "topk:0.1"]

_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs for every row.")
_CODECS = flags.DEFINE_list("codecs", CODECS, "Activation codecs, one row each.")
_GRADIENT_CODEC = flags.DEFINE_string(
    "gradient_codec", "float32", "Codec of the gradients in every row."
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/codecs", "Runs go here.")
_SEEDS = flags.DEFINE_list(
    "seeds", ["0"], "Seeds: every codec trains once per seed; accuracy is the mean."
)


def _config(codec, seed):
    c = fashion_mnist_lenet.get_config()
    c.seed = seed
    c.train.epochs = _EPOCHS.value
    c.transport.activation_codec = codec
    c.transport.gradient_codec = _GRADIENT_CODEC.value
    return c


def main(argv):
    del argv
    results, accuracies = {}, {}
    seeds = [int(seed) for seed in _SEEDS.value]
    for codec in _CODECS.value:
        for seed in seeds:
            name = "".join(ch if ch.isalnum() else "_" for ch in codec)
            workdir = os.path.join(_WORKDIR.value, f"{name}_seed{seed}")
            shutil.rmtree(workdir, ignore_errors=True)
            summary = experiment.train_and_evaluate(_config(codec, seed), workdir)
            results.setdefault(codec, summary)  # bytes and steps/s: first seed
            accuracies.setdefault(codec, []).append(summary["test_accuracy"])
    mean = {codec: sum(a) / len(a) for codec, a in accuracies.items()}
    base = results.get("float32")
    print(
        f"\nFashion-MNIST, LeNet-5 split at pool1, 1 client, {_EPOCHS.value} "
        f"epochs, Adam 1e-3, batch 64; gradients: {_GRADIENT_CODEC.value}; "
        f"seeds {seeds}\n"
    )
    print(
        "| activation codec | MB up | up / float32 | MB down | steps/s | "
        "test accuracy (mean) | per seed | vs float32 (points) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for codec, s in results.items():
        ratio = f"{s['bytes_up'] / base['bytes_up']:.3f}" if base else ""
        delta = f"{100 * (mean[codec] - mean['float32']):+.2f}" if base else ""
        per_seed = " ".join(f"{a:.4f}" for a in accuracies[codec])
        print(
            f"| {codec} | {s['bytes_up'] / 1e6:.1f} | {ratio} | "
            f"{s['bytes_down'] / 1e6:.1f} | {s['steps'] / s['wall_seconds']:.0f} | "
            f"{mean[codec]:.4f} | {per_seed} | {delta} |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
