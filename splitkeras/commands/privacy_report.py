r"""The privacy report: accuracy vs dCor leakage vs reconstruction vs label
inference by model completion, per defense and cut, and the accuracy-dCor
Pareto frontier over cuts, settings and epochs.

  splitkeras privacy-report --config=fashion_mnist_lenet \
      --workdir=workdirs/privacy --config.train.epochs=3 \
      [--alphas=0,0.01,0.1,0.5,1 --noises=0.5,1] [--cuts=pool1,pool2,fc1]

Writes workdir/report.md (the table and the frontier), report.json,
report.png, pareto.png and, per run, its workdir with a reconstructions.png
grid (see splitkeras/studies/privacy_report.py).
"""

import os

from absl import flags

from splitkeras import cli
from splitkeras.commands.attack_flags import attack_kwargs
from splitkeras.studies.privacy_report import privacy_report

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the report.")
_ALPHAS = flags.DEFINE_list(
    "alphas", ["0", "0.01", "0.1", "0.5", "1"], "NoPeek alphas."
)
_NOISES = flags.DEFINE_list("noises", ["0.5", "1"], "Activation noise std values.")
_CUTS = flags.DEFINE_list(
    "cuts",
    [],
    "Cut points to compare (vanilla splits); none: the config's model.cut.",
)
_KNOWN = flags.DEFINE_integer(
    "known_per_class", 4, "Labelled examples per class for model completion."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    privacy_report(
        _CONFIG.value,
        _WORKDIR.value,
        alphas=[float(a) for a in _ALPHAS.value if a],
        noises=[float(s) for s in _NOISES.value if s],
        cuts=[c for c in _CUTS.value if c],
        **attack_kwargs(),
        known_per_class=_KNOWN.value,
    )
    with open(os.path.join(_WORKDIR.value, "report.md")) as f:
        print(f.read())


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
