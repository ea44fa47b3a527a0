r"""The attack table: every defense against every attack (reconstruction,
model completion, label leak AUCs, feature-space hijacking with and without
the hijack guard).

  splitkeras attack-table --config=fashion_mnist_lenet \
      --workdir=workdirs/attacks --config.topology=ushaped \
      --config.model.cut=pool1,fc2 --config.train.epochs=3 [--rows=0,1]

Writes workdir/attack_table.md and attack_table.json and, per row, the run's
workdir (see splitkeras/studies/attack_table.py; its ROWS are the rows).
"""

import os

from absl import flags

from splitkeras import cli
from splitkeras.commands.attack_flags import attack_kwargs
from splitkeras.studies.attack_table import ROWS, attack_table

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the table.")
_ROWS = flags.DEFINE_list(
    "rows",
    [],
    "Rows to run, numbers from 0 (default all): "
    + "; ".join(f"{i} {name}" for i, (name, _) in enumerate(ROWS)),
)
_HIJACK_STEPS = flags.DEFINE_integer(
    "hijack_steps", 600, "Steps of the client trained against the hijacker."
)
_PROBE_EVERY = flags.DEFINE_integer(
    "hijack_probe_every", 10, "The hijack guard's probe interval in that run."
)
_FREEZE = flags.DEFINE_bool(
    "hijack_freeze", False, "In that run the guard freezes the client at its alarm."
)
_KNOWN = flags.DEFINE_integer(
    "known_per_class", 4, "Labelled examples per class for model completion."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    attack_table(
        _CONFIG.value,
        _WORKDIR.value,
        rows=[int(r) for r in _ROWS.value] or None,
        hijack_steps=_HIJACK_STEPS.value,
        hijack_probe_every=_PROBE_EVERY.value,
        hijack_freeze=_FREEZE.value,
        **attack_kwargs(),
        known_per_class=_KNOWN.value,
    )
    with open(os.path.join(_WORKDIR.value, "attack_table.md")) as f:
        print(f.read())


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
