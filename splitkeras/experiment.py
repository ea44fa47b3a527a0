"""train_and_evaluate(config, workdir): the one entry point scripts call.

A run writes into `workdir`:
  config.json        the resolved config;
  train/, validation/ TensorBoard events (loss, accuracy, steps/s, bytes);
  checkpoints/<party>/ each party's own state, saved in step, so that a
                     killed run resumes from `workdir` alone;
  summary.json       the final figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import keras
import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras import distribute, federation, learning_rate
from splitkeras import models as model_zoo
from splitkeras.checkpointing import PartyCheckpoints, party_checkpoint
from splitkeras.cut import cut
from splitkeras.data.streaming import STREAMING, StreamingSource, open_source
from splitkeras.objective import metric_names
from splitkeras.parties.segment_step import compiled
from splitkeras.privacy.leakage import Leakage, attach_privacy
from splitkeras.progress import Progress, write_scalars
from splitkeras.split_model import SplitModel
from splitkeras.transport.codec import codec_pair

log = logging.getLogger("splitkeras")

__all__ = ["train_and_evaluate", "build_trainer", "METHODS"]

METHODS = (
    "split",
    "splitfed_v1",
    "splitfed_v2",
    "centralized",
    "fedavg",
    "large_batch_sgd",
)
TOPOLOGIES = ("vanilla", "ushaped", "vertical", "multihop", "multitask")
_ONE_CLIENT_TOPOLOGIES = ("multihop", "multitask")
SPLIT_METHODS = ("split", "splitfed_v1", "splitfed_v2")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


MIXED_PRECISION = ("", "mixed_float16", "mixed_bfloat16")


def _precision(config) -> str:
    policy = config.train.get("mixed_precision", "") or ""
    if policy not in MIXED_PRECISION:
        raise ValueError(
            f"unknown config.train.mixed_precision {policy!r}; choose one of "
            f"{', '.join(repr(p) for p in MIXED_PRECISION)}"
        )
    scaled = ("split", "splitfed_v1", "splitfed_v2", "centralized")
    if policy == "mixed_float16" and (
        config.topology != "vanilla" or config.method not in scaled
    ):
        raise ValueError(
            "mixed_float16 needs loss scaling, which splitkeras does for the "
            f"vanilla topology and the methods {', '.join(scaled)} (each party "
            "scales its own backward pass); use mixed_bfloat16 (no loss "
            f"scaling needed) for method={config.method!r}, "
            f"topology={config.topology!r}"
        )
    return policy


def _optimizer(config) -> keras.optimizers.Optimizer:
    """A fresh optimizer for one party; loss-scaled under mixed_float16."""
    opt = config.train.optimizer
    kwargs = {"learning_rate": learning_rate.for_epoch(config.train, 0)}
    if config.train.get("weight_decay", 0.0):
        kwargs["weight_decay"] = config.train.weight_decay
    if opt == "sgd":
        kwargs["momentum"] = config.train.momentum
    optimizer = keras.optimizers.get({"class_name": opt, "config": kwargs})
    if _precision(config) == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build_model(config, arrays, input_shape=None) -> keras.Model:
    """The uncut model of `config`, with weights drawn from `config.seed`."""
    keras.utils.set_random_seed(config.seed)
    policy = _precision(config)
    previous = keras.config.dtype_policy()
    if policy:  # layers compute in 16 bits and keep float32 weights
        keras.config.set_dtype_policy(policy)
    try:
        return model_zoo.build_model(
            config.model.name,
            input_shape=input_shape or arrays.input_shape,
            num_classes=arrays.num_classes,
            **dict(config.model.get("kwargs", {})),
        )
    finally:
        keras.config.set_dtype_policy(previous)


def cut_layers(config) -> str | tuple[str, ...]:
    """`config.model.cut` checked against `config.topology`."""
    at = tuple(name.strip() for name in config.model.cut.split(","))
    if config.topology not in TOPOLOGIES:
        raise ValueError(
            f"unknown config.topology {config.topology!r}; available: "
            f"{', '.join(TOPOLOGIES)}"
        )
    # vertical: one cut per client's copy; multihop: client | relay | server.
    expected = 2 if config.topology in ("ushaped", "multihop") else 1
    if len(at) != expected:
        raise ValueError(
            f"config.topology={config.topology!r} needs {expected} cut layer(s) "
            f"in config.model.cut, got {config.model.cut!r}"
        )
    return at if len(at) > 1 else at[0]


def load_data(config):
    """The dataset of `config.data`: numpy arrays, or a `StreamingSource`
    for datasets read per epoch (imagenet2012)."""
    if config.data.name in STREAMING:
        return open_source(config)
    return data_lib.load(config.data.name, config.data.path, config.data.download)


def build_segments(config, arrays):
    """The config's model (seeded, as every party builds it) cut at its cut."""
    return cut(build_model(config, arrays), cut_layers(config))


def _check_method(config):
    if config.method not in METHODS:
        raise ValueError(
            f"unknown config.method {config.method!r}; available: {', '.join(METHODS)}"
        )


def _uses_schedule(config) -> bool:
    """Multi-client runs and federated baselines run epoch by epoch."""
    _check_method(config)
    if config.method == "centralized":
        return False
    if config.topology in ("vertical", *_ONE_CLIENT_TOPOLOGIES):
        return True
    if config.get("server", {}).get("strategy", "none") != "none":
        return True  # the round robin hosts the distributed server
    return config.method != "split" or config.num_clients > 1


def build_schedule(config, arrays, server_strategy=None):
    """The multi-client schedule of `config.method` (see `federation`)."""
    from splitkeras.schedules import schedule_for

    input_shape = arrays.input_shape
    if config.topology in ("vertical", *_ONE_CLIENT_TOPOLOGIES) and (
        config.method != "split"
    ):
        raise ValueError(
            f"config.topology={config.topology!r} needs config.method='split', "
            f"got {config.method!r}"
        )
    if config.topology in _ONE_CLIENT_TOPOLOGIES and config.num_clients != 1:
        raise ValueError(
            f"config.topology={config.topology!r} runs one client; set "
            f"config.num_clients=1 (got {config.num_clients})"
        )
    if config.topology == "vertical":
        # Each client's segment sees its strip of the image (see federation).
        height, width, channels = input_shape
        if width % config.num_clients:
            raise ValueError(
                f"image width {width} does not split into config.num_clients="
                f"{config.num_clients} equal strips"
            )
        input_shape = (height, width // config.num_clients, channels)

    def build():
        model = build_model(config, arrays, input_shape)
        if config.topology == "multitask":
            groups = federation.task_groups(config)
            num_groups = int(tf.reduce_max(groups)) + 1
            model = model_zoo.with_task_head(
                model, config.multitask.head_from, num_groups, "task1_logits"
            )
        return model

    return schedule_for(
        config,
        build_model=build,
        make_optimizer=lambda: _optimizer(config),
        loss=_loss(),
        at=cut_layers(config) if config.method in SPLIT_METHODS else None,
        server_strategy=server_strategy,
    )


def build_trainer(config, model) -> keras.Model:
    """The compiled model that trains `model` with `config.method`.

    `split` and `centralized` share the uncut model's initial weights, so
    with the same seed they see the same data in the same order.
    """
    _check_method(config)
    method = config.method
    run_eagerly = config.train.run_eagerly
    if method == "centralized":
        model.compile(
            optimizer=_optimizer(config),
            loss=_loss(),
            metrics=list(metric_names(config)),
            run_eagerly=run_eagerly,
            jit_compile=bool(config.train.get("jit_compile", False)),
        )
        return model
    split = SplitModel(model, cut_layers(config), codec=codec_pair(config))
    split.compile(
        client_optimizer=_optimizer(config),
        server_optimizer=_optimizer(config),
        loss=_loss(),
        metrics=list(metric_names(config)),
        run_eagerly=run_eagerly,
        jit_compile=bool(config.train.get("jit_compile", False)),
    )
    return split


def _checkpoints(trainer, workdir, loop_state) -> PartyCheckpoints:
    root = os.path.join(workdir, "checkpoints")
    if isinstance(trainer, SplitModel):
        # The client holds the data, so it holds the data position.
        parties = {
            "client_0": trainer.client.checkpoint(
                **loop_state, **trainer.transport.counters_of(0)
            ),
            "server": trainer.server.checkpoint(step=loop_state["step"]),
        }
    else:
        parties = {
            "model": party_checkpoint([trainer], trainer.optimizer, **loop_state)
        }
    return PartyCheckpoints(root, parties)


def _bytes(trainer) -> dict:
    if isinstance(trainer, SplitModel):
        return trainer.byte_counts()
    return {"bytes_up": 0, "bytes_down": 0}


def _scalars(logs) -> dict:
    return {k: float(v) for k, v in logs.items()}


def _evaluate(trainer, test_ds) -> dict:
    return trainer.evaluate(test_ds, verbose=0, return_dict=True)


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config`'s experiment in `workdir` and returns its summary.

    Resumes from the newest checkpoint in `workdir` if there is one.

    Args:
      config: an `ml_collections.ConfigDict` from `configs/`.
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
    tf.io.gfile.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    arrays = load_data(config)
    if _uses_schedule(config) or isinstance(arrays, StreamingSource):
        return _finish(
            config,
            workdir,
            arrays,
            *_run_multi_client(config, workdir, arrays, strategy),
        )
    trainer = build_trainer(config, build_model(config, arrays))
    if not isinstance(trainer, SplitModel):
        trainer.optimizer.build(trainer.trainable_variables)
    attach_privacy(trainer, config)
    leakage = Leakage(config, arrays)
    loop = _Loop()
    checkpoints = _checkpoints(trainer, workdir, loop.variables)
    restored = checkpoints.restore_latest()
    if restored is not None:
        loop.load()
        log.info("Resumed from step %d in %s", restored, workdir)
    test_ds = federation.test_data(config, arrays)

    def evaluate():
        return {**_evaluate(trainer, test_ds), **leakage(trainer)}

    test = _train(config, workdir, trainer, arrays, evaluate, loop, checkpoints)
    if test is None:  # stopped early, or nothing left to train: evaluate now
        test = evaluate()
    counts = _bytes(trainer)
    per_client = {key: [value] for key, value in counts.items()}
    extra = {
        "steps": loop.step,
        **counts,
        "per_client": per_client,
        "wall_seconds": loop.wall_seconds,
    }
    return _finish(config, workdir, arrays, test, extra)


def _run_multi_client(config, workdir, arrays, strategy=None):
    if config.train.max_steps:
        raise ValueError(
            f"config.train.max_steps={config.train.max_steps} stops single-client "
            "runs mid-epoch; this run (several clients, a baseline or a stream) "
            "trains and checkpoints whole epochs: set config.train.epochs instead"
        )
    schedule = build_schedule(config, arrays, strategy)
    attach_privacy(schedule, config)
    leakage = Leakage(config, arrays)
    test_ds = federation.test_data(config, arrays)

    def evaluate(s):
        return {**s.evaluate(test_ds), **leakage(s)}

    done = federation.run_schedule(
        config,
        workdir,
        schedule,
        arrays,
        evaluate,
        client_flops_per_epoch=_client_flops_per_epoch(config, arrays),
    )
    # The last epoch's validation is the final weights' test result.
    test = done.pop("validation") or evaluate(schedule)
    leaked = {k: test.pop(k) for k in list(test) if k.startswith(_LEAKAGE)}
    if "accuracy" not in test:  # multi-task: report task 0, keep every task
        tasks = dict(test)
        test = {"accuracy": tasks["task_0/accuracy"], "loss": tasks["task_0/loss"]}
        test["tasks"] = tasks
    test.update(leaked)
    per_client = schedule.byte_counts()
    totals = {key: sum(values) for key, values in per_client.items()}
    for direction in ("bytes_up", "bytes_down"):
        # Multi-hop and multi-task count per link ("hop_0/bytes_up", ...).
        links = [v for k, v in totals.items() if k.endswith("/" + direction)]
        totals.setdefault(direction, sum(links))
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    return test, {
        **totals,
        "per_client": per_client,
        **done,
        "server_replicas": replicas,
    }


def _client_flops_per_epoch(config, arrays):
    """One client's training FLOPs per epoch, for round-robin / SplitFed /
    FedAvg / large-batch SGD with image data; None for other topologies."""
    from splitkeras.accounting import tables

    if config.topology not in ("vanilla", "ushaped"):
        return None
    if isinstance(arrays, StreamingSource):
        return None  # scripts/resource_table.py has the ImageNet figures
    a = tables.assumptions(config, arrays)
    return tables.client_flops(a, _FLOPS_METHOD[config.method], config.num_clients) / (
        a.epochs
    )


_FLOPS_METHOD = {
    "split": "split",
    "splitfed_v1": "splitfed",
    "splitfed_v2": "splitfed",
    "fedavg": "fedavg",
    "large_batch_sgd": "large_batch_sgd",
}


_LEAKAGE = ("leakage_", "label_leak_")  # privacy measurements in the logs


def _finish(config, workdir, arrays, test, extra) -> dict:
    summary = {
        "method": config.method,
        "model": config.model.name,
        "dataset": arrays.name,
        "num_clients": int(config.num_clients),
        "topology": config.topology,
        "test_accuracy": float(test["accuracy"]),
        "test_loss": float(test["loss"]),
        **(
            {"test_top5_accuracy": float(test["top5_accuracy"])}
            if "top5_accuracy" in test
            else {}
        ),
        **{k: float(v) for k, v in test.items() if k.startswith(_LEAKAGE)},
        "privacy": config.privacy.to_dict(),
        **({"test_tasks": test["tasks"]} if "tasks" in test else {}),
        "epochs": int(config.train.epochs),
        **extra,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    log.info("Summary: %s", summary)
    return summary


class _Loop:
    """Where the run is; mirrored into checkpointed variables when saving."""

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


def _check_finite(logs, loop):
    if not math.isfinite(logs["loss"]):
        raise NonFiniteLossError(
            f"training loss is {logs['loss']} at step {loop.step} (epoch "
            f"{loop.epoch}); lower config.train.learning_rate or check the data."
        )


def _save(checkpoints, loop, start, logs):
    _check_finite(logs, loop)  # never checkpoint diverged weights
    loop.wall_seconds = time.perf_counter() - start
    loop.store()
    checkpoints.save(loop.step)


def _train(config, workdir, trainer, arrays, evaluate, loop, checkpoints):
    """The training loop: steps, logs, validation, checkpoints.

    Returns the last epoch's validation results if this call ran it (the
    final weights' test figures), else None.
    """
    val = None
    bs, epochs = config.train.batch_size, config.train.epochs
    total = data_lib.steps_per_epoch(len(arrays.x_train), bs) * epochs
    max_steps = config.train.max_steps or None
    writers = {
        name: tf.summary.create_file_writer(os.path.join(workdir, name))
        for name in ("train", "validation")
    }
    step_fn = compiled(trainer.train_step, config.train.run_eagerly)
    progress = Progress(total, config.train.log_every_seconds, loop.step)
    start = time.perf_counter() - loop.wall_seconds
    first_step = loop.step + 1
    while loop.epoch < epochs:
        trainer.reset_metrics()
        rate = learning_rate.start_epoch(config.train, _optimizers(trainer), loop.epoch)
        if rate is not None:
            write_scalars(writers["train"], {"learning_rate": rate}, loop.step)
        ds = data_lib.train_dataset(
            arrays.x_train,
            arrays.y_train,
            bs,
            config.seed,
            loop.epoch,
            skip_batches=loop.batch_in_epoch,
        )
        for batch in ds:
            outputs = step_fn(batch)  # tensors: no sync until we read them
            loop.step += 1
            loop.batch_in_epoch += 1
            if progress.due(loop.step):
                logs = _scalars(outputs)
                _check_finite(logs, loop)
                progress.report(loop.step, logs)
                scalars = {**logs, **progress.rates(), **_bytes(trainer)}
                write_scalars(writers["train"], scalars, loop.step)
            if loop.step == first_step:
                progress.restart(loop.step)  # steps/s without tracing time
            stop = max_steps is not None and loop.step >= max_steps
            if stop or loop.step % config.train.checkpoint_every_steps == 0:
                _save(checkpoints, loop, start, _scalars(outputs))
            if stop:
                log.info("Stopping at config.train.max_steps=%d", max_steps)
                return None
        loop.epoch += 1
        loop.batch_in_epoch = 0
        val = _end_epoch(config, trainer, evaluate, loop, writers["validation"])
        _save(checkpoints, loop, start, _scalars(outputs))
    return val


def _optimizers(trainer) -> list:
    if isinstance(trainer, SplitModel):
        return trainer.optimizers
    return [trainer.optimizer]


def _end_epoch(config, trainer, evaluate, loop, writer) -> dict:
    val = evaluate()
    write_scalars(writer, {**val, **_bytes(trainer)}, loop.step)
    rounded = {k: round(float(v), 4) for k, v in val.items()}
    log.info("epoch %d/%d: validation %s", loop.epoch, config.train.epochs, rounded)
    return val
