r"""The cut-point advisor: every valid cut's client cost, bytes, LiteRT
latency and leakage in one table, and the cut that meets your budgets.

  splitkeras advise-cut --config=fashion_mnist_lenet \
      --workdir=workdirs/advise_lenet [--train_steps=300] [--cuts=pool1,pool2] \
      [--max_dcor=0.5 --max_bytes_per_example=4000 --max_client_flops=1e6 \
       --max_latency_ms=1]

Each cut's split is trained for --train_steps steps (config.train.max_steps;
0: the config's epochs) in workdir/cut_<name>/, then attacked (dCor leakage,
a reconstruction decoder's SSIM) and its client segment exported to LiteRT
and timed at batch 1. Writes workdir/advisor.md, advisor.json and
advisor.png (see splitkeras/studies/cut_advisor.py); prints the table and the
recommendation (a budget of 0 is no budget).
"""

import os

from absl import flags

from splitkeras import cli
from splitkeras.commands.attack_flags import attack_kwargs
from splitkeras.studies.cut_advisor import advise

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs and tables.")
_CUTS = flags.DEFINE_list("cuts", [], "Cuts to measure (default: every valid cut).")
_STEPS = flags.DEFINE_integer(
    "train_steps", 300, "Training steps per cut (0: config.train.epochs)."
)
_REPEATS = flags.DEFINE_integer(
    "latency_repeats", 50, "Timed LiteRT invocations per cut (0: not measured)."
)
_THREADS = flags.DEFINE_integer(
    "latency_threads", 1, "LiteRT interpreter threads (0: LiteRT's default)."
)
_MAX_DCOR = flags.DEFINE_float("max_dcor", 0.0, "Largest dCor leakage (0: none).")
_MAX_BYTES = flags.DEFINE_float(
    "max_bytes_per_example", 0.0, "Most bytes up per example (0: no budget)."
)
_MAX_FLOPS = flags.DEFINE_float(
    "max_client_flops", 0.0, "Most client forward FLOPs per example (0: none)."
)
_MAX_LATENCY = flags.DEFINE_float(
    "max_latency_ms", 0.0, "Longest LiteRT client latency per example (0: none)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    _, recommendation = advise(
        _CONFIG.value,
        _WORKDIR.value,
        cuts=[c for c in _CUTS.value if c] or None,
        train_steps=_STEPS.value,
        **attack_kwargs(),
        latency_repeats=_REPEATS.value,
        latency_threads=_THREADS.value or None,
        budgets={
            "max_dcor": _MAX_DCOR.value,
            "max_bytes_per_example": _MAX_BYTES.value,
            "max_client_flops": _MAX_FLOPS.value,
            "max_latency_ms": _MAX_LATENCY.value,
        },
    )
    with open(os.path.join(_WORKDIR.value, "advisor.md")) as f:
        print(f.read())
    del recommendation  # its message ends advisor.md


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
