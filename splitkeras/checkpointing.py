"""Checkpoints of one party's own state.

Keras 3 models are not tracked as children by `tf.train.Checkpoint`, so a
party's checkpoint names each of its variables by its Keras path (weights,
batch-norm statistics and dropout seed states alike) next to its optimizer
and whatever loop state the caller adds.
"""

from __future__ import annotations

import os

import tensorflow as tf

__all__ = [
    "CheckpointMismatch",
    "load_trained",
    "party_checkpoint",
    "PartyCheckpoints",
    "restore_fitting",
]


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the program restoring it (another
    model, cut or optimizer, or a setting that adds state, such as
    `config.privacy.nopeek_adapt`)."""


def _variables_by_path(models) -> dict:
    named = {}
    for model in models:
        if model is None:
            continue
        for variable in model.variables:
            key = variable.path.replace("/", ".")
            while key in named and named[key] is not variable:
                key += "_"
            named[key] = variable
    return named


def party_checkpoint(models, optimizer=None, **extra) -> tf.train.Checkpoint:
    """A checkpoint of `models`' variables, `optimizer` and `extra` state.

    Args:
      models: the party's segments (None entries are skipped).
      optimizer: the party's optimizer, or None.
      **extra: more trackables (e.g. loop counters as `tf.Variable`s).
    """
    parts = {"variables": tf.train.Checkpoint(**_variables_by_path(models))}
    if optimizer is not None:
        parts["optimizer"] = optimizer
    return tf.train.Checkpoint(**parts, **extra)


_DETAILS = 500  # characters of TensorFlow's own message kept


def restore_fitting(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restores `path` into `checkpoint`, every object of the program found.

    Raises:
      CheckpointMismatch: an object the checkpoint lacks, or a variable of
        another shape. (A missing or corrupt file raises TensorFlow's
        OpError: not a mismatch.)
    """
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise CheckpointMismatch(
            f"{path} does not fit this run: {str(e)[:_DETAILS]}"
        ) from e


class PartyCheckpoints:
    """Saves and restores several parties' checkpoints in step.

    Each party writes its own directory under `root` (as it would on its own
    machine). A restore takes the newest step that every party has saved, so
    a run killed between two parties' saves resumes consistently.
    """

    def __init__(self, root: str, checkpoints: dict, max_to_keep: int = 2):
        self.managers = {
            name: tf.train.CheckpointManager(
                ckpt, os.path.join(root, name), max_to_keep=max_to_keep
            )
            for name, ckpt in checkpoints.items()
        }

    def save(self, step: int) -> None:
        for manager in self.managers.values():
            manager.save(checkpoint_number=step)

    def _steps(self, manager) -> set[int]:
        return {int(path.rsplit("-", 1)[1]) for path in manager.checkpoints}

    def restore_latest(self) -> int | None:
        """Restores the newest step saved by every party; returns it or None.

        Raises:
          CheckpointMismatch: a party's checkpoint does not fit its program.
        """
        common = None
        for manager in self.managers.values():
            steps = self._steps(manager)
            common = steps if common is None else common & steps
        if not common:
            return None
        step = max(common)
        for manager in self.managers.values():
            path = os.path.join(manager.directory, f"ckpt-{step}")
            restore_fitting(manager.checkpoint, path)
        return step


def load_trained(models, workdir: str, party: str, weights_file: str, optimizer=None):
    """Loads a trained party's `models` from `workdir`; returns what it read.

    Either `workdir/weights_file` (a gRPC party's final weights; models[0])
    or the newest checkpoint under `workdir/checkpoints/party` (a
    `splitkeras train` run; with `optimizer`, its state too).

    Raises:
      FileNotFoundError: `workdir` has neither.
    """
    weights = os.path.join(workdir, weights_file)
    if os.path.exists(weights):
        models[0].load_weights(weights)
        return weights
    directory = os.path.join(workdir, "checkpoints", party)
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(
            f"{workdir} has neither {weights_file} nor checkpoints under "
            f"{directory}: point it at a trained run's directory"
        )
    restored = party_checkpoint(models, optimizer).restore(path).expect_partial()
    restored.assert_existing_objects_matched()
    return path
