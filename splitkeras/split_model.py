"""SplitModel: a cut Keras model trained split, with the Keras API.

`SplitModel` holds one client and the server of a split model in one process
and connects them with the in-process transport. It is a `keras.Model`, so
`compile`, `fit`, `evaluate`, `predict`, callbacks and `History` work as a
Keras user expects; underneath, every step goes through the message protocol:
each party runs its own `tf.GradientTape` and its own optimizer, and only cut
tensors, their gradients and (vanilla) labels cross the transport, which
counts the bytes. Keras compiles `train_step` with `tf.function`, so the
parties' computations and the transport fuse into one graph.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import optimizers

from splitkeras.cut import Segments, cut
from splitkeras.parties import Client, Server
from splitkeras.transport.codec import as_pair
from splitkeras.transport.local import LocalTransport

__all__ = ["SplitModel"]


def _unpack(data):
    return keras.utils.unpack_x_y_sample_weight(data)


class SplitModel(keras.Model):
    """A Keras model cut into a client and a server, trained split.

    Args:
      model: the uncut functional or Sequential Keras model. Its layers are
        shared with the segments: training the SplitModel trains `model`.
      at: the cut layer name (vanilla: labels at the server) or two names
        (U-shaped: labels and loss stay on the client).
      codec: wire codec of the in-process transport, one name for both
        directions or a pair (up, down): "float32", "float16", "bfloat16",
        "int8", "int8_channel", "topk:F" (see `splitkeras.transport.codec`).
      name: the model name.

    Example:
      ```python
      split = splitkeras.SplitModel(model, at="pool1")
      split.compile(client_optimizer="adam", server_optimizer="adam",
                    loss=keras.losses.SparseCategoricalCrossentropy(True),
                    metrics=["accuracy"])
      history = split.fit(train_ds, epochs=3, validation_data=test_ds)
      ```
    """

    def __init__(self, model, at, codec="float32", name=None):
        super().__init__(name=name or f"split_{model.name}")
        self.segments: Segments = cut(model, at)
        self.original = model
        self.codec = as_pair(codec)
        self.client_optimizer = None
        self.server_optimizer = None
        self._parties = None
        self._step_counter = None
        self.built = True  # the segments are built models already

    @property
    def optimizers(self) -> list:
        """Every party's optimizer (`splitkeras.learning_rate.apply`)."""
        return [self.client_optimizer, self.server_optimizer]

    @property
    def ushaped(self) -> bool:
        return self.segments.ushaped

    def compile(
        self,
        client_optimizer="adam",
        server_optimizer="adam",
        loss=None,
        metrics=None,
        loss_weights=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile=False,
    ):
        """Gives each party its optimizer and the label holder the loss.

        Args:
          client_optimizer: the client's optimizer (name or instance).
          server_optimizer: the server's optimizer (name or instance); must be
            a different instance from the client's.
          loss, metrics, loss_weights, weighted_metrics: as in
            `keras.Model.compile`; computed by the party holding the labels
            (the server when vanilla, the client when U-shaped).
          run_eagerly: run steps eagerly, for debugging.
          steps_per_execution, jit_compile: as in `keras.Model.compile`.
        """
        if loss is None:
            raise ValueError("SplitModel.compile needs a loss, e.g. loss='mse'.")
        client_optimizer = optimizers.get(client_optimizer)
        server_optimizer = optimizers.get(server_optimizer)
        if client_optimizer is server_optimizer:
            raise ValueError(
                "client_optimizer and server_optimizer are the same object; "
                "each party needs its own optimizer instance."
            )
        super().compile(
            optimizer=None,
            loss=loss,
            metrics=metrics,
            loss_weights=loss_weights,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
        )
        self.client_optimizer = client_optimizer
        self.server_optimizer = server_optimizer
        self._build_parties()

    def _build_parties(self):
        segs = self.segments
        server = Server(
            segs.server,
            self.server_optimizer,
            objective=None if segs.ushaped else self._objective,
        )
        client = Client(
            segs.client,
            self.client_optimizer,
            client_id=0,
            tail=segs.tail,
            objective=self._objective if segs.ushaped else None,
        )
        client.build_optimizer()
        server.build_optimizer()
        transport = LocalTransport(server, 1, *self.codec)
        self._parties = (client, server, transport)
        if self._step_counter is None:
            self._step_counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    @property
    def client(self) -> Client:
        return self._require_parties()[0]

    @property
    def server(self) -> Server:
        return self._require_parties()[1]

    @property
    def transport(self) -> LocalTransport:
        return self._require_parties()[2]

    def _require_parties(self):
        if self._parties is None:
            raise RuntimeError(
                f"{self.name} has no parties yet: call compile(...) first."
            )
        return self._parties

    def _objective(self, y, y_pred, sample_weight, training):
        """The label holder's loss; also updates the loss tracker and metrics.

        The tracked loss adds every segment's regularization, as Keras logs
        it for the uncut model; that sum is bookkeeping of the simulation,
        not part of any party's objective.
        """
        del training
        loss = self._compile_loss(y, y_pred, sample_weight)
        logged = loss
        if self.losses:
            logged = loss + tf.add_n([tf.cast(r, loss.dtype) for r in self.losses])
        batch = tf.shape(tf.nest.flatten(y_pred)[0])[0]
        self._loss_tracker.update_state(logged, sample_weight=batch)
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(y, y_pred, sample_weight)
        return loss

    def call(self, inputs, training=False):
        """The uncut forward pass (no transport), e.g. for `model(x)`."""
        out = self.segments.client(inputs, training=training)
        out = self.segments.server(out, training=training)
        if self.segments.tail is not None:
            out = self.segments.tail(out, training=training)
        return out

    def _next_step(self):
        return self._step_counter.assign_add(1)

    def train_step(self, data):
        x, y, sample_weight = _unpack(data)
        client, _, transport = self._require_parties()
        client.train_step(transport, self._next_step(), x, y, sample_weight)
        return self.get_metrics_result()

    def test_step(self, data):
        x, y, sample_weight = _unpack(data)
        client, _, transport = self._require_parties()
        client.evaluate_step(transport, self._step_counter, x, y, sample_weight)
        return self.get_metrics_result()

    def predict_step(self, data):
        x, _, _ = _unpack(data)
        client, _, transport = self._require_parties()
        return client.predict_step(transport, self._step_counter, x)

    def byte_counts(self) -> dict:
        """Bytes that crossed the cut so far, per direction (client 0)."""
        counts = self.transport.byte_counts()
        return {
            "bytes_up": counts["bytes_up"][0],
            "bytes_down": counts["bytes_down"][0],
        }

    def party_checkpoints(self, **extra) -> dict:
        """One `tf.train.Checkpoint` per party, each holding only its own state."""
        client, server, _ = self._require_parties()
        return {
            "client_0": client.checkpoint(**extra),
            "server": server.checkpoint(**extra),
        }
