"""Label leakage in U-shaped runs, with and without label protection.

Trains U-shaped LeNet-5 (`pool1,fc2`) on Fashion-MNIST once per setting
(output-gradient clipping or noise, Marvell-style noise, or label DP by
randomized response) and prints test accuracy and the leak AUCs of Li et
al.'s norm and cosine attacks on the output gradients the server receives
(class 0 vs the rest; logged by every U-shaped run as label_leak_norm_auc
/ label_leak_cosine_auc).

  python benchmarks/label_leakage.py --epochs=3
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitkeras import experiment  # noqa: E402
from splitkeras.configs import fashion_mnist_lenet  # noqa: E402

_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per setting.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/label_leakage", "Runs go here.")
# (name, config.privacy settings)
SETTINGS = [
    ("none", {}),
    ("`gradient_max_norm=0.002`", {"gradient_max_norm": 0.002}),
    ("`gradient_noise=0.01`", {"gradient_noise": 0.01}),
    ("`gradient_noise=0.05`", {"gradient_noise": 0.05}),
    ("`label_epsilon=4`", {"label_epsilon": 4.0}),
    ("`label_epsilon=2`", {"label_epsilon": 2.0}),
    ("`label_epsilon=1`", {"label_epsilon": 1.0}),
    ("`marvell_strength=0.0625`", {"marvell_strength": 0.0625}),
    ("`marvell_strength=0.25`", {"marvell_strength": 0.25}),
    ("`marvell_strength=1`", {"marvell_strength": 1.0}),
    ("`marvell_strength=4`", {"marvell_strength": 4.0}),
]
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (numbers from 0).")
_SEED = flags.DEFINE_integer("seed", 0, "config.seed of every run.")


def main(argv):
    del argv
    rows = []
    for number, (name, privacy) in enumerate(SETTINGS):
        if _ONLY.value and str(number) not in _ONLY.value:
            continue
        c = fashion_mnist_lenet.get_config()
        c.train.epochs = _EPOCHS.value
        c.seed = _SEED.value
        c.topology = "ushaped"
        c.model.cut = "pool1,fc2"
        c.privacy.update(privacy)
        tag = "_".join(f"{k}{v:g}" for k, v in privacy.items()) or "none"
        if _SEED.value:
            tag += f"_seed{_SEED.value}"
        workdir = os.path.join(_WORKDIR.value, tag)
        s = experiment.train_and_evaluate(c, workdir)
        rows.append(
            (
                name,
                s["test_accuracy"],
                s["label_leak_norm_auc"],
                s["label_leak_cosine_auc"],
            )
        )
    print("| label protection | test accuracy | norm leak AUC | cosine leak AUC |")
    print("|---|---|---|---|")
    for name, acc, norm, cosine in rows:
        print(f"| {name} | {acc:.4f} | {norm:.3f} | {cosine:.3f} |")


if __name__ == "__main__":
    app.run(main)
