"""The one training loop: begin / round / end, for every process of a run.

`Runner` drives a process's part of a run, whatever the process holds: every
party (`splitkeras train`), a gRPC host (the server side), or one client.
It owns what every run needs and every process does the same way:

- progress lines every `config.train.log_every_seconds` (steps/s, ETA);
- TensorBoard scalars under `workdir/train` and `workdir/validation`;
- checkpoints of the process's own parties at each round's end (and every
  `config.train.checkpoint_every_steps` where the schedule can resume
  mid-round), and resume from the newest one;
- the stop on a non-finite training loss, and `config.train.max_steps`;
- `workdir/config.json` and `workdir/summary.json`.

What differs between processes is behind the `process` it runs (see
`RunnerProcess`): which rounds it trains, which logs it has, what it saves.

`test_loss` means the same everywhere: the mean of the label holder's loss
over the test examples, without weight or activity penalties (in a split
run no single party knows all of them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import tensorflow as tf

from splitkeras import learning_rate
from splitkeras.checkpointing import CheckpointMismatch, PartyCheckpoints
from splitkeras.progress import Progress, write_scalars

log = logging.getLogger("splitkeras")

__all__ = [
    "NonFiniteLossError",
    "Runner",
    "RunnerProcess",
    "cannot_resume",
    "read_config",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def read_config(workdir: str):
    """The config a run in `workdir` was started with (its `config.json`,
    with every override it was given), as an `ml_collections.ConfigDict`.

    Raises:
      FileNotFoundError: `workdir` holds no `config.json`.
    """
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a run's workdir (pass "
            "--config with the run's config and overrides)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def cannot_resume(who: str, workdir: str, config, error) -> CheckpointMismatch:
    """The error of a run in `workdir` whose checkpoint does not fit `config`'s
    program (`error`), with the settings changed since its config.json."""
    return CheckpointMismatch(
        f"{who}cannot resume the run in {workdir}: {error}\n"
        f"{_changes(workdir, config)}Resume it with the settings it was "
        "started with (more train.epochs is fine), or train in a new workdir."
    )


def _changes(workdir: str, config, most: int = 20) -> str:
    """The settings `config` changes from the run's config.json, a line each
    ("" if there is none or no such file)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        before = _flat(json.load(f))
    now = _flat(json.loads(config.to_json_best_effort()))
    changed = [
        f"  {key}: {before.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    if not changed:
        return f"Its settings ({path}) are this run's.\n"
    more = f"  ... {len(changed) - most} more\n" if len(changed) > most else ""
    lines = "\n".join(changed[:most])
    return f"Settings changed since it was started ({path}):\n{lines}\n{more}"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunnerProcess:
    """What a `Runner` needs from the process it drives (a base to subclass).

    Attributes:
      rounds: rounds (epochs) of the run.
      steps_per_round: training steps in one round, for progress (0: not
        known in this process).
      resumable_mid_round: the process can stop between two steps of a
        round and resume there (`round(epoch, skip)`).
      optimizers: the optimizers of the parties here (learning rates).
    """

    rounds = 0
    steps_per_round = 0
    resumable_mid_round = False
    optimizers = ()

    def checkpoints(self, **loop) -> dict:
        """{party: tf.train.Checkpoint} of this process's parties (+ `loop`)."""
        return {}

    def resumed(self, epochs_done: int) -> None:
        """Called after a restore."""

    def start_epoch(self, saved: int) -> int:
        """The round to start at, given the one the checkpoints say."""
        return saved

    def round(self, epoch: int, skip: int = 0):
        """Trains round `epoch` (after `skip` steps already trained); a
        generator yielding once per training step (its loss, or None)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once every round is trained (not after a max_steps stop),
        before the summary."""

    def logs(self, epoch: int) -> tuple[dict, dict]:
        """(training, validation) figures of a finished round ({} if none)."""
        return {}, {}

    def byte_counts(self) -> dict:
        """{name: [bytes per client]} so far."""
        return {}

    def summary(self, test: dict) -> dict:
        """The process's summary fields besides the loop's."""
        return {}

    def running_logs(self) -> dict:
        """The round's training figures so far, for progress lines."""
        return {}

    def attacks(self, workdir: str, step: int) -> dict:
        """At the end: attacks on the trained parties, written under
        `workdir` at `step`; their figures for the summary."""
        del workdir, step
        return {}

    def round_scalars(self, epoch: int) -> dict:
        """More TensorBoard scalars of a finished round (e.g. client FLOPs)."""
        return {}


class _Loop:
    """Where the run is, mirrored into checkpointed variables when saving."""

    def __init__(self):
        self.variables = {
            "step": tf.Variable(0, dtype=tf.int64, trainable=False),
            "epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
            "batch_in_epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
            "wall_seconds": tf.Variable(0.0, dtype=tf.float64, trainable=False),
        }
        self.load()

    def load(self):
        for key, variable in self.variables.items():
            setattr(self, key, variable.numpy().item())

    def store(self):
        for key, variable in self.variables.items():
            variable.assign(getattr(self, key))


class Runner:
    """Runs `process` for `config.train.epochs` rounds in `workdir`.

    Args:
      config: the run's config.
      workdir: this process's directory (created if missing).
      process: a `RunnerProcess`.
      name: how log lines name this process ("" for a one-process run).
    """

    def __init__(self, config, workdir: str, process: RunnerProcess, name: str = ""):
        self.config = config
        self.workdir = workdir
        self.process = process
        self.name = name
        self.loop = _Loop()
        self.last_validation = {}

    # ---------------------------------------------------------------- begin
    def begin(self) -> None:
        tf.io.gfile.makedirs(self.workdir)
        parties = self.process.checkpoints(**self.loop.variables)
        self.checkpoints = (
            PartyCheckpoints(os.path.join(self.workdir, "checkpoints"), parties)
            if parties
            else None
        )
        try:
            restored = self.checkpoints.restore_latest() if self.checkpoints else None
        except CheckpointMismatch as e:
            raise cannot_resume(self._who, self.workdir, self.config, e) from e
        # Written once resumed: a run that cannot resume keeps the record of
        # the settings its checkpoints were written with.
        with open(os.path.join(self.workdir, "config.json"), "w") as f:
            f.write(self.config.to_json_best_effort(indent=2, sort_keys=True))
        self.writers = {
            name: tf.summary.create_file_writer(os.path.join(self.workdir, name))
            for name in ("train", "validation")
        }
        if restored is not None:
            self.loop.load()
            self.process.resumed(self.loop.epoch)
            log.info("%sResumed at step %d in %s", self._who, restored, self.workdir)
        self.loop.epoch = self.process.start_epoch(self.loop.epoch)
        self.started = time.perf_counter() - self.loop.wall_seconds
        per_round = self.process.steps_per_round
        total = per_round * self.process.rounds if per_round else None
        self.progress = Progress(
            total, self.config.train.log_every_seconds, self.loop.step
        )

    @property
    def _who(self) -> str:
        return f"{self.name}: " if self.name else ""

    # ---------------------------------------------------------------- rounds
    def run(self) -> dict:
        """Every round still to train; returns the summary."""
        self.begin()
        stopped = False
        while self.loop.epoch < self.process.rounds and not stopped:
            stopped = self.train_round()
        if not stopped:
            self.process.finish()
        return self.end()

    def train_round(self) -> bool:
        """Trains the current round; True if it stopped early (max_steps)."""
        config, loop = self.config, self.loop
        epoch = loop.epoch
        began = time.perf_counter()
        rate = learning_rate.start_epoch(config.train, self.process.optimizers, epoch)
        max_steps = config.train.get("max_steps", 0) or None
        first = loop.step + 1
        for loss in self.process.round(epoch, loop.batch_in_epoch):
            loop.step += 1
            loop.batch_in_epoch += 1
            if loop.step == first:
                self.progress.restart(loop.step)  # steps/s without tracing time
            if self.progress.due(loop.step):
                self._report(loss)
            if self.process.resumable_mid_round:
                stop = max_steps is not None and loop.step >= max_steps
                if stop or loop.step % config.train.checkpoint_every_steps == 0:
                    self._check_finite(loss)
                    self.save()
                if stop:
                    log.info(
                        "%sStopping at config.train.max_steps=%d", self._who, max_steps
                    )
                    return True
        self._end_round(epoch, time.perf_counter() - began, rate)
        return False

    def _report(self, loss) -> None:
        logs = dict(self.process.running_logs())
        if loss is not None:
            logs.setdefault("loss", float(loss))
        self._check_finite(logs.get("loss"))
        self.progress.report(self.loop.step, logs)
        scalars = {**logs, **self.progress.rates(), **self._totals()}
        write_scalars(self.writers["train"], scalars, self.loop.step)

    def _end_round(self, epoch, seconds, rate) -> None:
        loop = self.loop
        train, val = self.process.logs(epoch)
        self._check_finite(train.get("loss"))
        totals = self._totals()
        scalars = {**train, "epoch_seconds": seconds, **totals}
        if rate is not None:
            scalars["learning_rate"] = rate
        scalars.update(self.process.round_scalars(epoch))
        write_scalars(self.writers["train"], scalars, epoch + 1)
        if val:
            write_scalars(self.writers["validation"], {**val, **totals}, epoch + 1)
        # The summary's test figures are the last round's, or none: never an
        # earlier round's passed off as the final ones.
        self.last_validation = val
        log.info(
            "%sepoch %d/%d (%.1f s): train %s validation %s",
            self._who,
            epoch + 1,
            self.process.rounds,
            seconds,
            _rounded(train),
            _rounded(val),
        )
        loop.epoch = epoch + 1
        loop.batch_in_epoch = 0
        self.save()

    def save(self) -> None:
        """Checkpoints this process's parties and the loop."""
        self.loop.wall_seconds = time.perf_counter() - self.started
        self.loop.store()
        if self.checkpoints is not None:
            self.checkpoints.save(self.loop.step)

    def _check_finite(self, loss) -> None:
        if loss is None:
            return
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at step {self.loop.step} (epoch "
                f"{self.loop.epoch}); lower config.train.learning_rate or check "
                "the data."
            )

    def _totals(self) -> dict:
        return {k: sum(v) for k, v in self.process.byte_counts().items()}

    # ------------------------------------------------------------------ end
    def end(self) -> dict:
        """Writes summary.json; returns it."""
        self.loop.wall_seconds = time.perf_counter() - self.started
        summary = {
            "epochs": int(self.config.train.epochs),
            "steps": int(self.loop.step),
            "wall_seconds": float(self.loop.wall_seconds),
            **self.process.summary(self.last_validation),
            **self.process.attacks(self.workdir, int(self.loop.step)),
        }
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        log.info("%sSummary: %s", self._who, summary)
        return summary


def _rounded(logs: dict) -> dict:
    return {k: round(float(v), 4) for k, v in logs.items()}
