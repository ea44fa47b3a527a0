"""Feature-space hijacking: a malicious server steers the client's training.

Pasquini, Ateniese and Bernaschi, "Unleashing the Tiger: Inference Attacks
on Split Learning" (CCS 2021). The server does not train the task at all.
It holds public inputs from the client's distribution and trains, on them,

- a pilot network f~ (here: the client segment's architecture with fresh
  weights) and a decoder f~^-1 as an autoencoder, so that f~'s feature
  space can be inverted;
- a critic D (Wasserstein GAN with gradient penalty) that tells the
  client's cut tensors f(x) from the pilot's f~(x_public).

The gradients it returns to the client are those of -D(f(x)): they move the
client's output into the pilot's feature space, where the decoder inverts
it. Success is measured on private inputs the server never saw: the SSIM of
f~^-1(f(x)) against x.

`FeatureSpaceHijacker` is a party (`handle(message)`) that stands in for the
server behind a `LocalTransport`: a vanilla client gets the hijacking
gradients for its TRAIN message (the loss it reports is the critic's); a
U-shaped client gets the honest-looking outputs of an untrained server
segment for TRAIN and the hijacking gradients for OUTPUT_GRADIENTS (the
client's output gradients are ignored).

`HijackingServer` puts the hijacker behind a gRPC host in the place of a
round-robin server (`splitkeras serve --hijack=...`): a red team's host for
checking a client's hijack guard over the real transport.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import tensorflow as tf

from splitkeras.privacy.attacks.reconstruction import build_decoder
from splitkeras.protocol import Kind, Message

__all__ = ["FeatureSpaceHijacker", "HijackingServer"]


class FeatureSpaceHijacker:
    """A server that hijacks the client's training (see the module docstring).

    Args:
      client_segment: a Keras model with the client segment's architecture
        (its weights are not used: the pilot gets fresh ones).
      public_inputs: the attacker's raw inputs, ``[n, ...]`` (numpy).
      server_segment: U-shaped: a segment mapping cut tensors to what the
        client's tail takes (answers TRAIN; never trained). None: vanilla.
      batch_size: public inputs per step.
      learning_rate: Adam's, for the autoencoder and the critic.
      gradient_penalty: the critic's gradient penalty weight (WGAN-GP).
      width: the decoder's and critic's width.
      seed: seeds the weights and the public batches.
    """

    def __init__(
        self,
        client_segment,
        public_inputs,
        *,
        server_segment=None,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        gradient_penalty: float = 10.0,
        width: int = 64,
        seed: int = 0,
    ):
        if len(client_segment.outputs) != 1:
            raise ValueError("the hijacker attacks a client that sends one cut tensor")
        public = np.asarray(public_inputs, "float32")
        input_shape = tuple(client_segment.inputs[0].shape[1:])
        if public.ndim < 1 or public.shape[1:] != input_shape:
            raise ValueError(
                f"the hijacker's public inputs are {public.shape[1:]} each; the "
                f"client segment takes {input_shape}"
            )
        activation_shape = tuple(client_segment.outputs[0].shape[1:])
        self.public = tf.constant(public)
        self.server_segment = server_segment
        self.batch_size = int(batch_size)
        self.gradient_penalty = float(gradient_penalty)
        self.pilot = _fresh_copy(client_segment, seed)
        in_range = bool(public.size) and public.min() >= 0.0 and public.max() <= 1.0
        self.decoder = build_decoder(
            activation_shape, public.shape[1:], width=width, sigmoid=in_range, seed=seed
        )
        self.critic = _critic(activation_shape, width, seed + 1000)
        self.autoencoder_optimizer = keras.optimizers.Adam(learning_rate)
        self.critic_optimizer = keras.optimizers.Adam(learning_rate)
        self.autoencoder_optimizer.build(self._autoencoder_variables)
        self.critic_optimizer.build(self.critic.trainable_variables)
        self._seeds = keras.random.SeedGenerator(seed)
        # U-shaped: (client, the gradients for its OUTPUT_GRADIENTS)
        self._pending = None

    @property
    def _autoencoder_variables(self) -> list:
        return self.pilot.trainable_variables + self.decoder.trainable_variables

    def reconstruct(self, cut) -> tf.Tensor:
        """The attacker's inverse of cut tensors: f~^-1(cut)."""
        return self.decoder(cut, training=False)

    def handle(self, message: Message) -> Message:
        """Answers a client's message as the hijacking server."""
        if message.kind == Kind.OUTPUT_GRADIENTS:
            if not self.waiting(message.client_id):
                raise ValueError("OUTPUT_GRADIENTS before any TRAIN message")
            (_, pending), self._pending = self._pending, None
            return message.answer(Kind.GRADIENTS, [pending])
        cut = message.tensors[0]
        if message.kind != Kind.TRAIN:  # EVALUATE / PREDICT: nothing learnt
            if self.server_segment is None:
                return message.answer(Kind.ACK, (), loss=tf.constant(0.0))
            return message.answer(Kind.SERVER_OUTPUT, self._outputs(cut))
        gradients, loss = self.step(cut)
        if self.server_segment is None:
            return message.answer(Kind.GRADIENTS, [gradients], loss=loss)
        self._pending = (message.client_id, gradients)
        return message.answer(Kind.SERVER_OUTPUT, self._outputs(cut))

    def waiting(self, client_id: int) -> bool:
        """A U-shaped step of `client_id` waits for its OUTPUT_GRADIENTS."""
        return self._pending is not None and self._pending[0] == client_id

    def forget(self) -> None:
        """Drops the gradients of a U-shaped step left open."""
        self._pending = None

    def step(self, cut):
        """One attack step on the client's `cut`: the autoencoder and the
        critic learn; returns (gradients for the client, the critic's loss)."""
        rows = keras.random.randint(
            [self.batch_size], 0, tf.shape(self.public)[0], seed=self._seeds
        )
        x = tf.gather(self.public, rows)
        with tf.GradientTape() as tape:
            pilot_cut = self.pilot(x, training=True)
            decoded = self.decoder(pilot_cut, training=True)
            autoencoder_loss = tf.reduce_mean(tf.square(decoded - x))
        variables = self._autoencoder_variables
        self.autoencoder_optimizer.apply_gradients(
            zip(tape.gradient(autoencoder_loss, variables), variables)
        )
        pilot_cut = tf.stop_gradient(pilot_cut)
        cut = tf.stop_gradient(tf.cast(cut, tf.float32))
        with tf.GradientTape() as tape:
            critic_loss = tf.reduce_mean(self.critic(cut, training=True)) - (
                tf.reduce_mean(self.critic(pilot_cut, training=True))
            )
            critic_loss += self.gradient_penalty * self._penalty(pilot_cut, cut)
        variables = self.critic.trainable_variables
        self.critic_optimizer.apply_gradients(
            zip(tape.gradient(critic_loss, variables), variables)
        )
        with tf.GradientTape() as tape:
            tape.watch(cut)
            # The client's cut should score as the pilot's does.
            hijack_loss = -tf.reduce_mean(self.critic(cut, training=False))
        return tape.gradient(hijack_loss, cut), hijack_loss

    def _penalty(self, pilot_cut, cut) -> tf.Tensor:
        """WGAN-GP: (|grad D| - 1)^2 between pilot and client cut tensors."""
        rows = tf.minimum(tf.shape(pilot_cut)[0], tf.shape(cut)[0])
        shape = tf.concat([[rows], tf.ones([len(cut.shape) - 1], tf.int32)], 0)
        mix = keras.random.uniform(shape, seed=self._seeds)
        between = mix * pilot_cut[:rows] + (1.0 - mix) * cut[:rows]
        with tf.GradientTape() as tape:
            tape.watch(between)
            scores = self.critic(between, training=True)
        grads = tf.reshape(tape.gradient(scores, between), [rows, -1])
        return tf.reduce_mean(tf.square(tf.norm(grads, axis=1) - 1.0))

    def _outputs(self, cut) -> list:
        return tf.nest.flatten(self.server_segment(cut, training=False))


class HijackingServer:
    """A round-robin host's server that hijacks: it shows the honest
    server's face (what a host checks arriving messages against, the
    outputs it announces) and answers every step with the hijacker.

    The honest server's segment and optimizer are never trained, and the
    host has no task figures of its own (no objective: a vanilla client's
    labels arrive and are not used). A vanilla hijacker's steps are
    compiled on the host, as the honest server's are; a U-shaped one
    answers eagerly (it keeps the gradients between a TRAIN and its
    OUTPUT_GRADIENTS). The hijacker's networks and optimizers are not in
    the host's commits: a rollback keeps what it learnt, and a host started
    again begins a new one.

    Args:
      server: the honest `Server` the run's config builds.
      hijacker: the `FeatureSpaceHijacker` that answers.
    """

    compile_paused_steps = None  # the honest server's U-shaped steps: unused
    objective = None  # no accuracy: the hijacker does not train the task

    def __init__(self, server, hijacker: FeatureSpaceHijacker):
        self.server = server
        self.hijacker = hijacker

    @property
    def compiled_kinds(self) -> tuple:
        if self.hijacker.server_segment is None:
            return (Kind.TRAIN, Kind.EVALUATE, Kind.PREDICT)
        return ()

    def handle(self, message: Message) -> Message:
        return self.hijacker.handle(message)

    def pending(self, client_id: int) -> bool:
        """A U-shaped step of `client_id` waits for its OUTPUT_GRADIENTS."""
        return self.hijacker.waiting(client_id)

    def rolled_back(self) -> None:
        self.hijacker.forget()

    def host_summary(self) -> dict:
        """What the host's summary says of it: that it hijacked (and, vanilla,
        why it has no test figures)."""
        fields = {"hijacker": {"public_inputs": int(self.hijacker.public.shape[0])}}
        if self.hijacker.server_segment is None:
            fields["test_figures"] = "none: a hijacking host trains no task"
        return fields

    def __getattr__(self, name):
        # arrival_specs, takes_labels, num_classes, output_specs, ...
        if name.startswith("_") or name in ("server", "hijacker"):
            raise AttributeError(name)
        return getattr(self.server, name)


def _fresh_copy(segment, seed: int) -> keras.Model:
    """The segment's architecture with new weights: the attacker's pilot
    network. Kernels are drawn anew (Glorot, from `seed`: a seeded
    initializer in the layers' configs would repeat the client's); the
    other weights (biases, batch norm) start as the layers initialize
    them."""
    pilot = keras.models.clone_model(segment)
    seeds = itertools.count(seed)
    for weight in pilot.trainable_weights:
        if len(weight.shape) >= 2:
            weight.assign(
                keras.initializers.GlorotUniform(seed=next(seeds))(weight.shape)
            )
    return pilot


def _critic(activation_shape, width: int, seed: int) -> keras.Model:
    """The critic D: cut tensors of one example -> one score."""
    seeds = itertools.count(seed)

    def init():
        return keras.initializers.GlorotUniform(seed=next(seeds))

    inputs = keras.Input(activation_shape)
    y = inputs
    if len(activation_shape) == 3:
        for filters in (width, 2 * width):
            y = keras.layers.Conv2D(
                filters, 3, strides=2, padding="same", kernel_initializer=init()
            )(y)
            y = keras.layers.LeakyReLU(0.2)(y)
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(4 * width, kernel_initializer=init())(y)
    y = keras.layers.LeakyReLU(0.2)(y)
    outputs = keras.layers.Dense(1, kernel_initializer=init())(y)
    return keras.Model(inputs, outputs, name="critic")
