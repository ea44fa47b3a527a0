"""Client-side defenses: NoPeek, noise on activations, label protection.

A `ClientPrivacy` is attached to a `Client` (`Client(..., privacy=...)` or
`client.privacy = ...`) and acts inside its compiled step:

- NoPeek (Vepakomma et al. 2020): the client adds `nopeek_alpha` x dCor(raw
  batch, cut tensors) to its own objective. The term joins the segment's
  regularization, so the client's update is the task gradient from the
  server plus alpha times the dCor gradient, in one optimizer step.
- Gaussian noise on the activations (`activation_noise`: its standard
  deviation, recorded in the config and the summary): the server receives
  cut + N(0, sigma^2). The noise is a constant for the gradient, so the
  client's gradient flows through the cut tensors unchanged.
- Label protection (U-shaped, where the server receives the gradients of
  its outputs): each example's gradient is clipped to `gradient_max_norm`
  and/or gets Gaussian noise of standard deviation `gradient_noise` before
  it is sent, which blunts the norm and direction attacks of Li et al.
  (ICLR 2022). The client's own tail update is not changed.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from splitkeras.privacy.distance_correlation import distance_correlation

__all__ = ["ClientPrivacy", "flat_batch", "from_config"]


def flat_batch(tensors) -> tf.Tensor:
    """One [batch, features] float matrix from a tensor or a list of them."""
    tensors = tf.nest.flatten(tensors)
    rows = [tf.reshape(tf.cast(t, tf.float32), [tf.shape(t)[0], -1]) for t in tensors]
    return rows[0] if len(rows) == 1 else tf.concat(rows, axis=1)


@dataclasses.dataclass
class ClientPrivacy:
    """What a client does to protect its inputs and labels.

    Attributes:
      nopeek_alpha: weight of dCor(raw batch, cut tensors) in the client's
        objective (0: off).
      activation_noise: standard deviation of the Gaussian noise added to
        the cut tensors the client sends (0: off).
      gradient_max_norm: U-shaped: per-example L2 bound on the output
        gradients sent to the server (0: off).
      gradient_noise: U-shaped: standard deviation of Gaussian noise added
        to those gradients (0: off).
      seed: seed of the noise.
    """

    nopeek_alpha: float = 0.0
    activation_noise: float = 0.0
    gradient_max_norm: float = 0.0
    gradient_noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in (
            "nopeek_alpha",
            "activation_noise",
            "gradient_max_norm",
            "gradient_noise",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._seeds = keras.random.SeedGenerator(self.seed)

    @property
    def active(self) -> bool:
        return any(
            (
                self.nopeek_alpha,
                self.activation_noise,
                self.gradient_max_norm,
                self.gradient_noise,
            )
        )

    def noised(self, cut) -> tuple:
        """The cut tensors as sent: + N(0, activation_noise^2) if set."""
        if not self.activation_noise:
            return tuple(cut)
        return tuple(
            c
            + keras.random.normal(
                tf.shape(c),
                stddev=self.activation_noise,
                dtype=c.dtype,
                seed=self._seeds,
            )
            for c in cut
        )

    def protect_activations(self, x, cut, reg):
        """(cut tensors to send, regularization + NoPeek term), under the tape."""
        if self.nopeek_alpha:
            term = self.nopeek_alpha * distance_correlation(
                flat_batch(x), flat_batch(cut)
            )
            reg = term if reg is None else reg + tf.cast(term, reg.dtype)
        return self.noised(cut), reg

    def protect_gradients(self, gradients) -> list:
        """Output gradients as sent to the server (clipped and/or noised)."""
        out = []
        for g in gradients:
            if self.gradient_max_norm:
                axes = list(range(1, len(g.shape)))
                norms = tf.sqrt(tf.reduce_sum(tf.square(g), axis=axes, keepdims=True))
                g = g * tf.minimum(1.0, self.gradient_max_norm / (norms + 1e-12))
            if self.gradient_noise:
                g = g + keras.random.normal(
                    tf.shape(g),
                    stddev=self.gradient_noise,
                    dtype=g.dtype,
                    seed=self._seeds,
                )
            out.append(g)
        return out


def from_config(config, client_id: int = 0) -> ClientPrivacy | None:
    """The `ClientPrivacy` of `config.privacy`, or None when every defense is off.

    `client_id` seeds the noise apart per client process (gRPC), so that no
    two clients draw the same noise.
    """
    p = config.privacy
    privacy = ClientPrivacy(
        nopeek_alpha=float(p.nopeek_alpha),
        activation_noise=float(p.activation_noise),
        gradient_max_norm=float(p.gradient_max_norm),
        gradient_noise=float(p.gradient_noise),
        seed=int(config.seed) * 10007 + int(client_id),
    )
    return privacy if privacy.active else None
