"""train_and_evaluate(config, workdir): the one entry point scripts call.

Every party of the config's schedule lives in this process, linked by the
in-process transport; the `Runner` trains it. A run writes into `workdir`:
  config.json        the resolved config;
  train/, validation/ TensorBoard events (loss, accuracy, steps/s, bytes);
  checkpoints/<party>/ each party's own state, saved in step, so that a
                     killed run resumes from `workdir` alone;
  summary.json       the final figures.
"""

from __future__ import annotations

import logging

from splitkeras import builders, client_data, distribute
from splitkeras.data.streaming import StreamingSource
from splitkeras.privacy.leakage import Leakage, attach_privacy
from splitkeras.runner import NonFiniteLossError, Runner, RunnerProcess
from splitkeras.schedules import alignment
from splitkeras.schedules.alignment import Aligner
from splitkeras.schedules.splitfed import interleave
from splitkeras.transport.counters import ByteCounters
from splitkeras.transport.local import LocalTransport
from splitkeras.transport.turns import yield_all

log = logging.getLogger("splitkeras")

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

# Privacy figures in the logs.
_LEAKAGE = ("leakage_", "label_leak_", "hijack_", "nopeek_adapted_alpha")


class InProcess(RunnerProcess):
    """Every party of `schedule` in this process, fed from the clients' sites."""

    def __init__(self, config, schedule, data, strategy=None):
        self.config = config
        self.schedule = schedule
        self.data = data
        self.strategy = strategy
        self.rounds = int(config.train.epochs)
        self.resumable_mid_round = schedule.resumable_mid_round
        self.sites = client_data.sites(config, data)
        self.alignment = None
        if config.topology == "vertical":
            self.sites, self.alignment = align_sites(self.sites)
            self.test = client_data.vertical_test(config, self.sites)
        else:
            self.test = client_data.test_batches(config, self.sites[0], data)
        first = self.sites[0]
        self.leakage = Leakage(
            config,
            first if hasattr(first, "x_test") else data,
            strips=self.sites if config.topology == "vertical" else None,
        )
        self.leakage.measure_start(schedule)  # before any step (and restore)
        self.client_flops = client_data.client_flops_per_epoch(config, self.sites, data)
        self.steps_per_round = client_data.steps_per_round(config, self.sites, data)
        self.dataset_name = getattr(first, "data_name", "") or getattr(data, "name", "")
        _check_max_steps(config, schedule)

    @property
    def optimizers(self):
        return self.schedule.optimizers

    def checkpoints(self, **loop) -> dict:
        return self.schedule.checkpoints(**loop)

    def resumed(self, epochs_done: int) -> None:
        self.schedule.resumed(epochs_done)

    def datasets(self, epoch):
        """Every client's training batches of round `epoch` (vertical: the
        parties' batches together)."""
        config = self.config
        if config.topology == "vertical":
            return client_data.vertical_round(config, self.sites, epoch)
        return [
            client_data.train_batches(config, site, k, epoch, self.data)
            for k, site in enumerate(self.sites)
        ]

    def round(self, epoch, skip=0):
        yield from self.schedule.round(epoch, self.datasets(epoch), self.test, skip)

    def logs(self, epoch):
        train, val = self.schedule.round_logs(epoch)
        val = dict(val)
        return dict(train), {**val, **self.leakage(self.schedule, val.get("accuracy"))}

    def round_scalars(self, epoch) -> dict:
        if self.client_flops is None:
            return {}
        # What one client has computed so far (seed: accuracy vs client FLOPs).
        return {"client_tflops": (epoch + 1) * self.client_flops / 1e12}

    def attacks(self, workdir, step) -> dict:
        return self.leakage.reconstruction(self.schedule, workdir, step)

    def byte_counts(self) -> dict:
        counts = dict(self.schedule.byte_counts())
        if self.alignment is not None:
            counts.update(self.alignment)
        return counts

    def summary(self, test: dict) -> dict:
        if not test:  # stopped early, or nothing left to train: evaluate now
            test = self.schedule.evaluate(self.test)
            test = {**test, **self.leakage(self.schedule, test.get("accuracy"))}
        per_client = self.byte_counts()
        replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
        return {
            **summary_fields(self.config, self.dataset_name, test),
            **self.leakage.summary(),
            **byte_totals(per_client),
            "per_client": per_client,
            "server_replicas": replicas,
        }


def align_sites(all_sites, label_owner: int = 0):
    """The vertical parties' private set intersection, all in this process:
    (their aligned sites, {alignment bytes per client})."""
    parties = len(all_sites)
    counters = ByteCounters.for_categories(("alignment",), parties)
    link = LocalTransport(Aligner(parties, label_owner), parties, counters=counters)
    programs = [
        alignment.align(link, k, parties, client_data.vertical_ids(site))
        for k, site in enumerate(all_sites)
    ]
    rows = yield_all(interleave(programs))
    aligned = [client_data.aligned_site(s, r) for s, r in zip(all_sites, rows)]
    return aligned, counters.as_dict()


def summary_fields(config, dataset_name: str, test: dict) -> dict:
    """The summary's description of the run and its test figures."""
    test = dict(test)
    if "accuracy" not in test and "task_0/accuracy" in test:
        tasks = {k: v for k, v in test.items() if k.startswith("task_")}
        test = {
            **test,
            "accuracy": tasks["task_0/accuracy"],
            "loss": tasks["task_0/loss"],
            "tasks": tasks,
        }
    fields = {
        "method": config.method,
        "model": config.model.name,
        "dataset": dataset_name,
        "num_clients": int(config.num_clients),
        "topology": config.topology,
        "privacy": config.privacy.to_dict(),
        **{k: float(v) for k, v in test.items() if k.startswith(_LEAKAGE)},
    }
    if "accuracy" in test:
        fields["test_accuracy"] = float(test["accuracy"])
        fields["test_loss"] = float(test["loss"])
    else:
        fields["test_figures"] = (
            "none: the last round ended without an evaluation (its evaluating "
            "client's turn was skipped, or there is no test data)"
        )
    if "top5_accuracy" in test:
        fields["test_top5_accuracy"] = float(test["top5_accuracy"])
    if "tasks" in test:
        fields["test_tasks"] = test["tasks"]
    return fields


def byte_totals(per_client: dict) -> dict:
    """Bytes over all clients per counter; links' counters also summed per
    direction ("hop_0/bytes_up" + "hop_1/bytes_up" -> "bytes_up")."""
    totals = {key: sum(values) for key, values in per_client.items()}
    for direction in ("bytes_up", "bytes_down"):
        links = [v for k, v in totals.items() if k.endswith("/" + direction)]
        totals.setdefault(direction, sum(links))
    return totals


def _check_max_steps(config, schedule) -> None:
    if config.train.max_steps and not schedule.resumable_mid_round:
        raise ValueError(
            f"config.train.max_steps={config.train.max_steps} stops a run "
            "mid-round, which runs where one client trains at a time can do "
            f"(round robin, centralized); this run (method={config.method!r}, "
            f"topology={config.topology!r}) trains and checkpoints whole rounds: "
            "set config.train.epochs instead"
        )


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config`'s experiment in `workdir` and returns its summary.

    Resumes from the newest checkpoint in `workdir` if there is one.

    Args:
      config: an `ml_collections.ConfigDict` from `splitkeras/configs/`.
      workdir: where the run writes everything (created if missing); a
        non-chief worker of a multi_worker server writes into
        `workdir/worker_<index>` instead (`distribute.worker_workdir`).

    Returns:
      The summary written to `workdir/summary.json`.

    Raises:
      NonFiniteLossError: the training loss became NaN or infinite.
    """
    # First: logical devices can only be set up before TensorFlow places ops.
    strategy = distribute.make_strategy(config.get("server", {}))
    distribute.check_supported(config, strategy)
    workdir = distribute.worker_workdir(strategy, workdir)
    builders.check_method(config)
    data = client_data.shared_data(config)
    if isinstance(data, StreamingSource) and config.topology not in (
        "vanilla",
        "ushaped",
    ):
        raise ValueError(
            f"{data.name} streams to round-robin style runs (vanilla, U-shaped); "
            f"got config.topology={config.topology!r}"
        )
    schedule = builders.build_schedule(config, data, strategy)
    attach_privacy(schedule, config)
    return Runner(config, workdir, InProcess(config, schedule, data, strategy)).run()
