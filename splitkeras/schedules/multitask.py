"""Multi-task split learning (Vepakomma et al. 2018, "Split learning for health").

One client segment feeds several server heads, one per task. Each head is
its own server party with its own optimizer, its own labels and its own
loss. The client sends its cut tensors to every head (each head gets only
the cut tensors it uses, and only its own task's labels), receives each
head's gradients, sums them and applies one update:

```
client: x ──segment──► a ─task_0─► head 0: a ──► out_0, loss_0(y_0) ─► dL_0/da
                         └task_1─► head 1: a ──► out_1, loss_1(y_1) ─► dL_1/da
client: tape.gradient(a, vars, output_gradients=dL_0/da + dL_1/da)
```

With loss weights 1 this is the gradient of the uncut multi-output model's
total loss, so with the same batches training equals `model.fit` with
`loss=[loss_0, loss_1, ...]`. Each head is linked by its own
`LocalTransport`, which encodes with the codec and counts bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from splitkeras.cut import cut
from splitkeras.data.pipeline import batches_in
from splitkeras.objective import Objective
from splitkeras.parties import Client, Server
from splitkeras.parties.segment_step import compiled, optimizer_factory
from splitkeras.protocol import Kind, Message
from splitkeras.schedules.base import Schedule
from splitkeras.schedules.coordinator import Rounds
from splitkeras.transport.codec import as_pair
from splitkeras.transport.local import LocalTransport

__all__ = ["MultiTask", "TaskClient", "task_heads"]


def _inputs_used(inputs, output) -> list[int]:
    """Positions of the `inputs` tensors that `output` depends on."""
    wanted = {id(t): j for j, t in enumerate(inputs)}
    used, seen, stack = set(), set(), [output]
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in wanted:
            used.add(wanted[id(tensor)])
            continue
        operation, node_index, _ = tensor._keras_history
        if operation is not None:
            stack.extend(operation._inbound_nodes[node_index].input_tensors)
    return sorted(used)


def _layer_name(tensor) -> str:
    return tensor._keras_history[0].name


def task_heads(server_segment: keras.Model, cut_layer: str) -> list:
    """One head model per output of `server_segment`, sharing no layers.

    Args:
      server_segment: the server segment of a multi-output model.
      cut_layer: the cut layer, for error messages.

    Returns:
      `(head, used)` per output: the head maps the cut tensors at positions
      `used` (of the segment's inputs) to that output.

    Raises:
      ValueError: two outputs share a layer after the cut (named).
    """
    inputs = list(server_segment.inputs)
    outputs = list(server_segment.outputs)
    heads, owner = [], {}
    for i, output in enumerate(outputs):
        used = _inputs_used(inputs, output)
        head_inputs = [inputs[j] for j in used]
        head = keras.Model(
            head_inputs[0] if len(head_inputs) == 1 else head_inputs,
            output,
            name=f"{server_segment.name}_head_{i}",
        )
        for layer in head.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            first = owner.setdefault(id(layer), i)
            if first != i:
                raise ValueError(
                    f"layer '{layer.name}' is used by task heads {first} "
                    f"(output '{_layer_name(outputs[first])}') and {i} (output "
                    f"'{_layer_name(output)}') after the cut at '{cut_layer}'; "
                    "each head is its own server party and must own its "
                    f"layers. Cut at or after '{layer.name}' so the client "
                    "holds it, or give each task its own copy."
                )
        heads.append((head, used))
    return heads


def _metrics_per_task(metrics, num_tasks) -> list:
    """`metrics` for every task, or one sequence per task if given so."""
    metrics = list(metrics)
    per_task = metrics and all(isinstance(m, (list, tuple)) for m in metrics)
    if not per_task:
        return [metrics] * num_tasks
    if len(metrics) != num_tasks:
        raise ValueError(
            f"got metrics for {len(metrics)} tasks but the model has "
            f"{num_tasks} outputs"
        )
    return metrics


class TaskClient:
    """The multi-task client's program: one forward, one message per head
    (only the cut tensors it uses, only its task's labels), the heads'
    gradients summed into one update; BEGIN, END and REPORT go to every head.

    Args:
      client: the `Client` party.
      links: one link per head (in one process, or gRPC to each head).
      used: per head, the positions of the cut tensors it uses.
      run_eagerly / jit_compile: how the steps are compiled.
    """

    def __init__(self, client, links, used, run_eagerly=False, jit_compile=False):
        self.client = client
        self.links = list(links)
        self._used = list(used)
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self._eval_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        steps = (self._train_step, self._evaluate_step, self._predict_step)
        steps = [compiled(f, run_eagerly, jit_compile) for f in steps]
        self.train_fn, self.evaluate_fn, self.predict_fn = steps
        self.leakage = None

    @property
    def client_id(self) -> int:
        return self.client.client_id

    @property
    def steps(self) -> int:
        return int(self._step.numpy())

    @property
    def step_variable(self) -> tf.Variable:
        """The training step counter (what a checkpoint keeps)."""
        return self._step

    def _send(self, kind, step, cut_tensors, ys=None) -> list[Message]:
        """Sends head i its cut tensors (and task i's labels); returns replies."""
        replies = []
        for i, (link, used) in enumerate(zip(self.links, self._used)):
            request = Message(
                kind=kind,
                client_id=self.client.client_id,
                step=step,
                tensors=tuple(cut_tensors[j] for j in used),
                labels=None if ys is None else ys[i],
            )
            replies.append(link.request(request))
        return replies

    def _summed_gradients(self, cut_tensors, replies) -> list:
        total = [None] * len(cut_tensors)
        for used, reply in zip(self._used, replies):
            for j, grad in zip(used, reply.tensors):
                total[j] = grad if total[j] is None else total[j] + grad
        return [
            tf.zeros_like(c) if g is None else g for c, g in zip(cut_tensors, total)
        ]

    def _train_step(self, x, ys):
        forward = self.client.forward(x)
        replies = self._send(Kind.TRAIN, self._step.assign_add(1), forward.cut, ys)
        self.client.backward(forward, self._summed_gradients(forward.cut, replies))
        return [r.loss for r in replies]

    def _control(self, kind, epoch, **fields):
        for link in self.links:
            link.poll(Message(kind, self.client_id, self.steps, round=epoch, **fields))

    def begin(self, epoch: int, batches: int):
        self._control(Kind.BEGIN, epoch, count=batches)

    def train(self, epoch: int, dataset):
        """The round's steps on `(x, (y_0, ...))` batches; then END."""
        examples = 0
        for x, ys in dataset:
            yield tf.add_n(list(self.train_fn(x, tuple(ys))))
            examples += int(tf.nest.flatten(x)[0].shape[0])
        self._control(Kind.END, epoch, count=examples)

    def evaluate(self, dataset) -> None:
        self._eval_step.assign(0)  # each pass numbers its batches from 1
        for x, ys in dataset:
            self.evaluate_fn(x, tuple(ys))

    def finish(self, epoch: int, test=None) -> None:
        """Sends the test batches to every head, which then gets a REPORT."""
        if test is None:
            return
        self.evaluate(test)
        figures = self.leakage(self.client) if self.leakage else {}
        self._control(Kind.REPORT, epoch, metrics=figures)

    def _evaluate_step(self, x, ys):
        step = self._eval_step.assign_add(1)
        replies = self._send(Kind.EVALUATE, step, self.client.infer(x), ys)
        return [r.loss for r in replies]

    def _predict_step(self, x):
        replies = self._send(Kind.PREDICT, self._step, self.client.infer(x))
        return [_unflat(r.tensors) for r in replies]


class MultiTask(Schedule):
    """One client segment, one server head (party) per task.

    Args:
      model: a functional Keras model with H outputs, one per task; the
        segments share its layers, so training them trains `model`.
      at: the one cut layer. Every layer after it belongs to exactly one
        task's head.
      make_optimizer: zero-argument callable returning a new optimizer (one
        per party), or an optimizer name.
      losses: H Keras losses; head i computes `losses[i]` (loss weights 1).
      metrics: metric names for every head ("accuracy": sparse categorical),
        or H sequences, one per head.
      codec: the wire codec of every client-head link: one name (both
        directions) or an (activations, gradients) pair.
      run_eagerly: run steps eagerly instead of as `tf.function`s.
      jit_compile: compile the steps with XLA.

    Attributes:
      client: the `Client` holding the raw data and the client segment.
      heads: H `Server`s; head i holds task i's segment, loss and metrics.
      links: H `LocalTransport`s; link i carries messages to head i.

    Raises:
      ValueError: `at` names more than one layer, `losses` does not have H
        entries, two heads share a layer, or `cut` refuses the cut.
    """

    def __init__(
        self,
        model: keras.Model,
        at: str | Sequence[str],
        make_optimizer: Callable[[], keras.optimizers.Optimizer],
        losses: Sequence,
        metrics=("accuracy",),
        codec: str | tuple[str, str] = "float32",
        run_eagerly: bool = False,
        jit_compile: bool = False,
    ):
        names = (at,) if isinstance(at, str) else tuple(at)
        if len(names) != 1:
            raise ValueError(
                f"multi-task split learning cuts at one layer; got {list(names)}"
            )
        num_tasks = len(model.outputs)
        losses = list(losses)
        if len(losses) != num_tasks:
            raise ValueError(
                f"model '{model.name}' has {num_tasks} outputs but got "
                f"{len(losses)} losses; pass one loss per output"
            )
        make = optimizer_factory(make_optimizer)
        segments = cut(model, names[0])
        heads = task_heads(segments.server, names[0])
        metrics = _metrics_per_task(metrics, num_tasks)
        self.objectives = [Objective(f, m) for f, m in zip(losses, metrics)]
        self.heads = [
            Server(head, make(), objective=objective)
            for (head, _), objective in zip(heads, self.objectives)
        ]
        self._used = [used for _, used in heads]
        # Each head coordinates its own rounds (it commits its own state).
        self.coordinators = [Rounds(h, 1) for h in self.heads]
        self.coordinator = self.coordinators[0]
        self.num_clients = 1
        self.links = [LocalTransport(c, 1, *as_pair(codec)) for c in self.coordinators]
        self.client = Client(segments.client, make(), client_id=0)
        for party in [self.client, *self.heads]:
            party.build_optimizer()
        # The one client's program, a list as in the other schedules.
        self.programs = [
            TaskClient(self.client, self.links, self._used, run_eagerly, jit_compile)
        ]

    @property
    def program(self) -> TaskClient:
        return self.programs[0]

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [p.optimizer for p in [self.client, *self.heads]]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _labels(self, ys) -> tuple:
        ys = tuple(ys)
        if len(ys) != self.num_tasks:
            raise ValueError(
                f"got {len(ys)} label tensors for {self.num_tasks} tasks; pass "
                "one per task, in output order"
            )
        return ys

    def train_step(self, x, ys) -> list:
        """One training step; `ys` holds one label tensor per task.

        Returns:
          The H task losses of the batch.
        """
        return self.program.train_fn(x, self._labels(ys))

    def _results(self, training) -> dict:
        results = {}
        for i, objective in enumerate(self.objectives):
            for key, value in objective.result(training).items():
                results[f"task_{i}/{key}"] = value
        results["loss"] = sum(results[f"task_{i}/loss"] for i in range(self.num_tasks))
        return results

    def round(self, epoch, client_datasets, test=None, skip=0):
        """Round `epoch`: BEGIN with every head, the steps, END with every
        head; with `test`, the evaluation, REPORTed to every head."""
        if isinstance(client_datasets, (list, tuple)) and len(client_datasets) == 1:
            (client_datasets,) = client_datasets
        self.program.begin(epoch, batches_in(client_datasets))
        yield from self.program.train(
            epoch, ((x, self._labels(ys)) for x, ys in client_datasets)
        )
        if test is not None:
            for objective in self.objectives:
                objective.reset(training=False)
            self.program.finish(epoch, test)

    def round_logs(self, epoch) -> tuple:
        """Every head's figures as "task_i/<name>", and "loss" (their sum)."""
        combined = []
        for part in (0, 1):
            logs = {}
            for i, coordinator in enumerate(self.coordinators):
                for key, value in coordinator.logs[epoch][part].items():
                    logs[f"task_{i}/{key}"] = value
            if logs:
                logs["loss"] = sum(
                    logs[f"task_{i}/loss"] for i in range(self.num_tasks)
                )
            combined.append(logs)
        return tuple(combined)

    def evaluate(self, dataset) -> dict:
        """Mean task losses and metrics over `(x, (y_0, ...))` batches.

        Returns:
          "task_i/loss", "task_i/<metric>" per task and "loss" (their sum).
        """
        for objective in self.objectives:
            objective.reset(training=False)
        for x, ys in dataset:
            self.program.evaluate_fn(x, self._labels(ys))
        return self._results(training=False)

    def predict(self, x, batch_size=None) -> list:
        """The H heads' outputs for `x`, in batches; a list of tensors."""
        n = len(x)
        size = batch_size or max(n, 1)
        batches = [self.program.predict_fn(x[i : i + size]) for i in range(0, n, size)]
        return [tf.concat(list(task), axis=0) for task in zip(*batches)]

    def byte_counts(self) -> dict:
        """Bytes carried so far on each client-head link, per direction.

        Returns:
          {"task_0/bytes_up": [n], "task_0/bytes_down": [n], "task_1/...":
          ...}; each value lists the bytes per client (one), as
          `LocalTransport` does.
        """
        counts = {}
        for i, link in enumerate(self.links):
            for key, values in link.byte_counts().items():
                counts[f"task_{i}/{key}"] = values
        return counts

    def checkpoints(self, **extra) -> dict:
        """One checkpoint per party: "client_0" and "head_0", "head_1", ...

        The client (the sender on every link) keeps the links' byte counters.
        """
        state = {"multitask_step": self.program.step_variable, **extra}
        counters = {
            f"task_{i}_{key}": variable
            for i, link in enumerate(self.links)
            for key, variable in link.counters_of(0).items()
        }
        parties = {"client_0": self.client.checkpoint(**state, **counters)}
        for i, (head, coordinator) in enumerate(zip(self.heads, self.coordinators)):
            parties[f"head_{i}"] = head.checkpoint(
                **state, coordinator=tf.train.Checkpoint(**coordinator.trackables())
            )
        return parties


def _unflat(tensors):
    tensors = list(tensors)
    return tensors[0] if len(tensors) == 1 else tensors
