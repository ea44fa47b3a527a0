"""The label holder's loss and metrics, for schedules outside `keras.Model`.

Whoever holds the labels (the server when vanilla, each client when
U-shaped) owns an `Objective`: it computes the loss, and tracks the mean loss
and the metrics over the batches it has seen, separately for training and
for evaluation.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["Objective", "metric_names"]


def metric_names(config) -> tuple:
    """`config.train.metrics` as metric names ("accuracy", "top5", ...)."""
    names = config.train.get("metrics", "accuracy") or "accuracy"
    return tuple(m.strip() for m in names.split(",") if m.strip()) or ("accuracy",)


def _in_float32(tensor):
    tensor = tf.convert_to_tensor(tensor)
    return tf.cast(tensor, tf.float32) if tensor.dtype.is_floating else tensor


class _Mean:
    """A per-example loss function reduced as Keras does ("sum over batch")."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, y, y_pred, sample_weight=None):
        per_example = self.fn(y, y_pred)
        if sample_weight is not None:
            per_example *= tf.cast(sample_weight, per_example.dtype)
        return tf.reduce_mean(per_example)


class Objective:
    """A loss plus running metrics (one set for training, one for evaluation).

    Args:
      loss: a Keras loss (name or instance), reduced over the batch.
      metrics: Keras metric names or instances (e.g. ["accuracy"]); the name
        "accuracy" means sparse categorical accuracy on integer labels,
        "top5" sparse top-5 accuracy (logged as top5_accuracy).
    """

    def __init__(self, loss, metrics=("accuracy",)):
        found = keras.losses.get(loss)
        self.loss = found if isinstance(found, keras.losses.Loss) else _Mean(found)
        self._trackers = {
            mode: [keras.metrics.Mean(name="loss")] + [self._metric(m) for m in metrics]
            for mode in (True, False)
        }

    @staticmethod
    def _metric(metric):
        """A fresh metric object (training and evaluation never share one)."""
        if metric == "accuracy":
            return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        if metric == "top5":  # ImageNet's other figure
            return keras.metrics.SparseTopKCategoricalAccuracy(
                k=5, name="top5_accuracy"
            )
        if isinstance(metric, keras.metrics.Metric):
            return metric.__class__.from_config(metric.get_config())
        found = keras.metrics.get(metric)
        if isinstance(found, keras.metrics.Metric):
            return found
        # A metric function such as "mae": track its mean over examples.
        name = metric if isinstance(metric, str) else found.__name__
        return keras.metrics.MeanMetricWrapper(found, name=name)

    def __call__(self, y, y_pred, sample_weight=None, training=True):
        loss = self.loss(y, y_pred, sample_weight=sample_weight)
        self.track(y, y_pred, loss, sample_weight, training)
        return loss

    def per_example_loss(self, y, y_pred):
        """The loss of each example in float32 (for `tf.distribute`): the
        mean over any further axes, so that averaging over the global batch
        gives the "sum over batch size" reduction of the one-device loss."""
        # As Keras's Loss.__call__ does: 16-bit outputs of a mixed-precision
        # segment are scored in float32.
        y_pred = tf.nest.map_structure(_in_float32, y_pred)
        if isinstance(self.loss, _Mean):
            values = self.loss.fn(y, y_pred)
        else:
            if self.loss.reduction not in ("sum_over_batch_size", "auto"):
                raise ValueError(
                    f"a distributed server averages the loss over the batch; "
                    f"loss reduction {self.loss.reduction!r} is not supported"
                )
            values = self.loss.call(y, y_pred)
        values = tf.cast(values, tf.float32)
        if values.shape.rank and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    def track(self, y, y_pred, loss, sample_weight=None, training=True):
        """Updates the running loss and metrics with a batch's `loss`."""
        loss_tracker, *metrics = self._trackers[bool(training)]
        batch = tf.shape(tf.nest.flatten(y_pred)[0])[0]
        loss_tracker.update_state(loss, sample_weight=batch)
        for metric in metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)

    def result(self, training=True) -> dict:
        """The running values, as Python floats."""
        return {m.name: float(m.result()) for m in self._trackers[bool(training)]}

    def reset(self, training=True) -> None:
        for metric in self._trackers[bool(training)]:
            metric.reset_state()
