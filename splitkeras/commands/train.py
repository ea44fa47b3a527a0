r"""Trains one experiment: a config and a workdir.

  splitkeras train --config=fashion_mnist_lenet \
      --workdir=workdirs/fmnist [--config.train.epochs=2 ...]

Run it again with the same --workdir to resume a stopped run.
"""

from absl import flags

from splitkeras import cli, experiment

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.check_config(_CONFIG.value)
    cli.use_threads(_CONFIG.value)
    summary = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    test = (
        f"test accuracy: {summary['test_accuracy']:.4f} "
        f"(test loss {summary['test_loss']:.4f}"
        if "test_accuracy" in summary
        else f"test figures: {summary['test_figures']} ("
    )
    print(
        f"{test}, {summary['steps']} steps, {summary['wall_seconds']:.0f} s; "
        f"summary in {_WORKDIR.value}/summary.json)"
    )


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
