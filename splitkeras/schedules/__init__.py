"""Schedules: who trains when, and how weights travel between parties."""

from splitkeras import distribute
from splitkeras.cut import cut
from splitkeras.objective import metric_names
from splitkeras.parties.vertical_server import label_protection
from splitkeras.schedules.base import Schedule
from splitkeras.schedules.centralized import Centralized
from splitkeras.schedules.fedavg import FedAvg
from splitkeras.schedules.large_batch_sgd import LargeBatchSGD
from splitkeras.schedules.multihop import MultiHop
from splitkeras.schedules.multitask import MultiTask
from splitkeras.schedules.round_robin import RoundRobin
from splitkeras.schedules.splitfed import SplitFed
from splitkeras.schedules.vertical import VerticalSplit, align, split_image_halves
from splitkeras.transport.codec import codec_pair

__all__ = [
    "Centralized",
    "FedAvg",
    "LargeBatchSGD",
    "MultiHop",
    "MultiTask",
    "RoundRobin",
    "Schedule",
    "SplitFed",
    "VerticalSplit",
    "align",
    "pipelining",
    "schedule_for",
    "split_image_halves",
]


def pipelining(config) -> tuple[int, int]:
    """(micro-batches per step, steps a client may send ahead), checked.

    Raises:
      ValueError: out of range, or set for a configuration that does not
        pipeline its steps (only the vanilla round robin does).
    """
    count = int(config.train.get("microbatches", 1))
    ahead = int(config.train.get("max_staleness", 0))
    if count < 1 or ahead < 0:
        raise ValueError(
            f"config.train.microbatches must be >= 1 and config.train."
            f"max_staleness >= 0, got {count} and {ahead}"
        )
    if (count, ahead) == (1, 0):
        return count, ahead
    if config.method != "split" or config.topology != "vanilla":
        raise ValueError(
            "micro-batched and asynchronous steps (config.train.microbatches, "
            "max_staleness) run the vanilla round robin (config.method='split', "
            f"topology='vanilla'), not method={config.method!r} "
            f"topology={config.topology!r}"
        )
    if count > 1 and (
        config.train.get("mixed_precision", "") == "mixed_float16"
        or config.server.get("strategy", "none") != "none"
    ):
        raise ValueError(
            "micro-batched steps do not run with loss scaling (mixed_float16) "
            "or a distributed server (config.server.strategy)"
        )
    return count, ahead


def schedule_for(config, build_model, make_optimizer, loss, at, server_strategy=None):
    """The schedule for `config.method` with `config.num_clients` clients.

    `server_strategy` (a `tf.distribute.Strategy`) puts the server on several
    devices; the split round robin (vanilla) supports it.
    """
    k = config.num_clients
    distribute.check_supported(config, server_strategy)
    # What every schedule takes from config.train.
    common = {
        "metrics": metric_names(config),
        "jit_compile": bool(config.train.get("jit_compile", False)),
    }
    split_common = {
        **common,
        "codec": codec_pair(config),
        "run_eagerly": config.train.run_eagerly,
    }
    if config.method == "centralized":
        return Centralized(
            build_model(),
            make_optimizer(),
            loss,
            run_eagerly=config.train.run_eagerly,
            **common,
        )
    if config.topology == "vertical":
        segments = [cut(build_model(), at) for _ in range(k)]
        return VerticalSplit(
            [s.client for s in segments],
            segments[0].server,
            make_optimizer,
            loss,
            merge=config.vertical.merge,
            **label_protection(config),
            **split_common,
        )
    if config.topology == "multitask":
        model = build_model()
        return MultiTask(
            model,
            at,
            make_optimizer,
            [loss] * len(model.outputs),
            **split_common,
        )
    if config.topology == "multihop":
        return MultiHop(
            build_model(),
            at,
            make_optimizer,
            loss,
            **split_common,
        )
    if config.method in ("splitfed_v1", "splitfed_v2"):
        return SplitFed(
            build_model,
            at,
            k,
            make_optimizer,
            loss,
            version=int(config.method[-1]),
            **split_common,
        )
    if config.method == "split":
        return RoundRobin(
            build_model,
            at,
            k,
            make_optimizer,
            loss,
            handoff=config.weight_handoff,
            server_strategy=server_strategy,
            **dict(zip(("microbatches", "max_staleness"), pipelining(config))),
            **split_common,
        )
    if config.method == "fedavg":
        return FedAvg(
            build_model,
            k,
            make_optimizer,
            loss,
            local_epochs=config.fedavg.local_epochs,
            **common,
        )
    if config.method == "large_batch_sgd":
        return LargeBatchSGD(build_model, k, make_optimizer, loss, **common)
    raise ValueError(f"no multi-client schedule for config.method {config.method!r}")
