"""Client-side defenses: NoPeek, noise on activations, label protection.

A `ClientPrivacy` is attached to a `Client` (`Client(..., privacy=...)` or
`client.privacy = ...`) and acts inside its compiled step:

- NoPeek (Vepakomma et al. 2020): the client lowers dCor(raw batch, cut
  tensors) besides its task loss, in one optimizer step. Two ways
  (`nopeek_step`):
  - "normalized" (the default): the privacy gradient is taken apart from
    the task gradient, the part of it that opposes the task gradient is
    removed (projected out, as in gradient surgery), and it is rescaled to
    `nopeek_alpha` times the task gradient's global norm. Alpha is then the
    size of the privacy step relative to the task step, whatever the scale
    of dCor's gradient: it moves the client from the first steps (dCor's
    gradient is tiny on the plateau near 1), and it stops when the task
    gradient does (a client whose output went constant gets no further
    push). With `nopeek_target` set, a step whose dCor estimate is at or
    below the target gets no privacy part: the client stops pushing there
    and the task takes the rest of the budget. With `nopeek_warmup` the
    client's first updates get none: the task trains alone first. With
    `nopeek_adapt` as well, alpha follows the target: after each update
    past the warm-up it is multiplied by exp(nopeek_adapt x (estimate -
    target)), kept between `nopeek_alpha` and `ADAPT_MAX` times it, so a
    client whose dCor stalls above the target is pushed harder until it
    gets there, and the push eases once it is below.
  - "loss" (the paper's): `nopeek_alpha` x dCor joins the segment's
    regularization, so the update is the task gradient plus alpha times
    the dCor gradient.
  dCor is estimated on the batch together with the `nopeek_window` rows of
  the batches before it (their raw inputs and cut tensors, before any
  activation noise, as they were computed then; no gradient flows into
  them): one batch of 64 is a noisy estimate. The window holds this
  client's own rows only and stays in this process: it is not handed on
  with the weights (round robin), checkpointed, or emptied when a turn is
  rolled back, so after a turn of other clients its rows are a round old,
  and a resumed run starts with it empty. Stored cut tensors are stale:
  the client's step can lower the estimate by moving its new outputs away
  from the window's old ones, which the images do not explain, without
  lowering what a server could learn (our reading of runs that stalled,
  docs/privacy.md). With `nopeek_reencode` the current client encodes the
  batch's and the window's inputs again at every step, all in inference
  mode (no dropout, batch norm with its moving statistics), and the
  estimate is dCor of those inputs and those cut tensors, its gradient
  flowing through every row; the window's stored cut tensors are not
  used.
- Gaussian noise on the activations (`activation_noise`: its standard
  deviation, recorded in the config and the summary): the server receives
  cut + N(0, sigma^2). The noise is a constant for the gradient, so the
  client's gradient flows through the cut tensors unchanged.
- Label protection (U-shaped, where the server receives the gradients of
  its outputs): each example's gradient is clipped to `gradient_max_norm`
  and/or gets Gaussian noise of standard deviation `gradient_noise` before
  it is sent, which blunts the norm and direction attacks of Li et al.
  (ICLR 2022). `marvell_strength` > 0 adds Marvell-style noise shaped to
  the classes' gradients (`splitkeras.privacy.marvell`, from the labels
  the client trains with) first; clipping and noise then act on the
  result, so `gradient_max_norm` stays a bound on what is sent. The
  client's own tail update is not changed.
- A hijack guard (`hijack_probe_every` > 0): now and then a step with some
  labels rotated among the batch's examples tests whether the server's
  gradients depend on the labels (`splitkeras.privacy.hijack_guard`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import keras
import tensorflow as tf

from splitkeras.privacy.distance_correlation import distance_correlation
from splitkeras.privacy.hijack_guard import HijackGuard
from splitkeras.privacy.marvell import marvell_noise
from splitkeras.privacy.rows import flat_batch

__all__ = [
    "ADAPT_MAX",
    "GUARD_TOPOLOGIES",
    "MARVELL_TOPOLOGIES",
    "NOPEEK_STEPS",
    "ClientPrivacy",
    "NoPeekTerm",
    "flat_batch",
    "from_config",
]

NOPEEK_STEPS = ("normalized", "loss")
# The most `nopeek_adapt` raises alpha to, as a multiple of `nopeek_alpha`.
ADAPT_MAX = 10.0
# Where the label holder sends gradients that Marvell's noise can protect.
MARVELL_TOPOLOGIES = ("ushaped", "vertical")
# Where the client that holds the labels runs whole steps that the hijack
# guard probes (Client.train_step).
GUARD_TOPOLOGIES = ("vanilla", "ushaped")


class NoPeekTerm(NamedTuple):
    """A step's NoPeek term: dCor over the batch and the window, and the
    batch's rows that join the window once the step is applied."""

    dcor: tf.Tensor
    x_rows: tf.Tensor
    z_rows: tf.Tensor


@dataclasses.dataclass
class ClientPrivacy:
    """What a client does to protect its inputs and labels.

    Attributes:
      nopeek_alpha: strength of NoPeek (0: off): with `nopeek_step`
        "normalized", the privacy step's size relative to the task step's;
        with "loss", the weight of dCor in the client's objective.
      nopeek_step: "normalized" or "loss" (see the module docstring).
      nopeek_window: rows of earlier batches that join each batch's dCor
        estimate (0: the batch alone).
      nopeek_reencode: the batch's and the window's inputs pass through
        the current client in inference mode at every step, and dCor is
        taken of them, instead of the batch's cut tensors with the
        window's as they were computed then (needs `nopeek_window` and a
        client of one input).
      nopeek_target: the dCor NoPeek aims for (0: none, NoPeek always
        pushes): a normalized step gets its privacy part only while the
        step's dCor estimate (batch and window) is above it, so the client
        stops at the target and the task takes the rest of the budget.
      nopeek_warmup: the client's first optimizer updates without the
        normalized step's privacy part (0: from the first): the task
        trains alone, then NoPeek pushes.
      nopeek_adapt: with `nopeek_target`, how fast alpha follows the
        target (0: alpha stays `nopeek_alpha`): each applied update past
        the warm-up multiplies it by exp(nopeek_adapt x (the step's dCor
        estimate - nopeek_target)), within [nopeek_alpha, ADAPT_MAX x
        nopeek_alpha]. Like the window, the adapted alpha is this
        client's own: in the client's checkpoint, not handed on.
      activation_noise: standard deviation of the Gaussian noise added to
        the cut tensors the client sends (0: off).
      gradient_max_norm: U-shaped: per-example L2 bound on the output
        gradients sent to the server (0: off).
      gradient_noise: U-shaped: standard deviation of Gaussian noise added
        to those gradients (0: off).
      hijack_probe_every: the hijack guard's probe interval in steps (0:
        no guard); `hijack_warmup`, `hijack_threshold`, `hijack_probes`,
        `hijack_fraction`, `hijack_freeze`: the rest of its settings (see
        `HijackGuard`).
      marvell_strength: U-shaped: Marvell-style noise on those gradients,
        its power budget as a multiple of the squared distance between a
        class's mean gradient and the rest's (0: off).
      seed: seed of the noise.
    """

    nopeek_alpha: float = 0.0
    nopeek_step: str = "normalized"
    nopeek_window: int = 256
    nopeek_reencode: bool = False
    nopeek_target: float = 0.0
    nopeek_warmup: int = 0
    nopeek_adapt: float = 0.0
    activation_noise: float = 0.0
    gradient_max_norm: float = 0.0
    gradient_noise: float = 0.0
    hijack_probe_every: int = 0
    hijack_warmup: int = 20
    hijack_threshold: float = 1.5
    hijack_probes: int = 5
    hijack_fraction: float = 0.25
    hijack_freeze: bool = True
    marvell_strength: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.nopeek_step not in NOPEEK_STEPS:
            raise ValueError(
                f"nopeek_step must be one of {', '.join(NOPEEK_STEPS)}, got "
                f"{self.nopeek_step!r}"
            )
        for name in (
            "nopeek_alpha",
            "nopeek_window",
            "nopeek_warmup",
            "nopeek_adapt",
            "activation_noise",
            "gradient_max_norm",
            "gradient_noise",
            "hijack_probe_every",
            "marvell_strength",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.nopeek_target < 1:
            raise ValueError(
                f"nopeek_target is a distance correlation in [0, 1), got "
                f"{self.nopeek_target}"
            )
        for name in ("nopeek_target", "nopeek_warmup", "nopeek_adapt"):
            if getattr(self, name) and self.nopeek_step != "normalized":
                raise ValueError(
                    f"{name}={getattr(self, name):g} gates the normalized "
                    f"step's privacy part: set nopeek_step='normalized', not "
                    f"{self.nopeek_step!r}"
                )
        if self.nopeek_reencode and not self.nopeek_window:
            raise ValueError(
                "nopeek_reencode encodes the window's rows again: set nopeek_window > 0"
            )
        if self.nopeek_adapt and not self.nopeek_target:
            raise ValueError(
                f"nopeek_adapt={self.nopeek_adapt:g} moves alpha toward "
                "nopeek_target: set nopeek_target too"
            )
        self._seeds = keras.random.SeedGenerator(self.seed)
        self._alpha = None  # the adapted alpha (nopeek_adapt)
        if self.nopeek_adapt and self.nopeek_alpha:
            self._alpha = tf.Variable(
                float(self.nopeek_alpha), trainable=False, name="nopeek_alpha"
            )
        self._memory = None  # (x rows, z rows, rows filled), made at first use
        self.guard = None
        if self.hijack_probe_every:
            self.guard = HijackGuard(
                self.hijack_probe_every,
                self.hijack_warmup,
                self.hijack_threshold,
                self.hijack_probes,
                self.hijack_fraction,
                freeze=self.hijack_freeze,
                seed=self.seed + 104729,
            )

    @property
    def active(self) -> bool:
        return any(
            (
                self.nopeek_alpha,
                self.activation_noise,
                self.gradient_max_norm,
                self.gradient_noise,
                self.hijack_probe_every,
                self.marvell_strength,
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

    @property
    def normalized(self) -> bool:
        """True when NoPeek's gradient is taken apart (`nopeek_gradients`)."""
        return bool(self.nopeek_alpha) and self.nopeek_step == "normalized"

    def protect_activations(self, x, cut, reg, encode=None):
        """(cut tensors to send, regularization, NoPeek term or None), under
        the tape. With `nopeek_step` "loss" the term's alpha x dCor joins the
        regularization; "normalized" leaves it to `nopeek_gradients`.
        `encode(inputs)`: the client's cut tensors of `inputs` in inference
        mode (for `nopeek_reencode`)."""
        if not self.nopeek_alpha:
            return self.noised(cut), reg, None
        x_rows, z_rows = flat_batch(x), flat_batch(cut)
        if self.nopeek_reencode:
            dcor = self._reencoded_dcor(x, x_rows, z_rows, encode)
        else:
            dcor = self._windowed_dcor(x_rows, z_rows)
        term = NoPeekTerm(dcor, x_rows, z_rows)
        if self.nopeek_step == "loss":
            weighted = self.nopeek_alpha * term.dcor
            reg = weighted if reg is None else reg + tf.cast(weighted, reg.dtype)
        return self.noised(cut), reg, term

    def nopeek_gradients(self, task, leak, dcor=None, updates=None) -> list:
        """The client's gradients with the normalized NoPeek step.

        Args:
          task: the task's gradients of the client's variables (None for a
            variable the task does not reach).
          leak: dCor's gradients of the same variables.
          dcor: the step's dCor estimate; with `nopeek_target` set, no
            privacy part is added unless it is above the target.
          updates: the client optimizer's updates so far; with
            `nopeek_warmup` set, no privacy part is added before that many.

        Returns:
          task + s * leak', where leak' is `leak` without its component
          along `task` when the two conflict (a step down dCor would then
          go up the task loss), and s = alpha * |task| / |leak'| (global
          norms; 0 when either is 0).
        """
        task, leak = list(task), list(leak)
        both = [i for i, (t, g) in enumerate(zip(task, leak)) if None not in (t, g)]
        if not both:
            return task
        for i in both:  # IndexedSlices (embeddings) densified where combined
            task[i], leak[i] = _dense(task[i]), _dense(leak[i])
        t_sq = tf.add_n([tf.reduce_sum(tf.square(task[i])) for i in both])
        dot = tf.add_n([tf.reduce_sum(task[i] * leak[i]) for i in both])
        # Gradient surgery: a conflicting privacy step loses its part along
        # the task's.
        along = tf.minimum(dot, 0.0) / _nonzero(t_sq)
        for i in both:
            leak[i] = leak[i] - along * task[i]
        l_sq = tf.add_n([tf.reduce_sum(tf.square(leak[i])) for i in both])
        alpha = self.nopeek_alpha
        if self._alpha is not None:
            alpha = tf.cast(self._alpha, t_sq.dtype)
        scale = tf.where(
            l_sq > 0.0,
            alpha * tf.sqrt(t_sq) / tf.sqrt(_nonzero(l_sq)),
            0.0,
        )
        if self.nopeek_target and dcor is not None:
            above = tf.cast(dcor > self.nopeek_target, scale.dtype)
            scale = scale * above
        scale = scale * tf.cast(self._past_warmup(updates), scale.dtype)
        for i in both:
            task[i] = task[i] + scale * leak[i]
        return task

    @property
    def adapted_alpha(self) -> float | None:
        """The alpha `nopeek_adapt` has reached (None: not adapting)."""
        return None if self._alpha is None else float(self._alpha.numpy())

    def trackables(self) -> dict:
        """NoPeek's state in the client's checkpoint: the adapted alpha."""
        return {} if self._alpha is None else {"nopeek_alpha": self._alpha}

    def remember(self, term: NoPeekTerm | None, applied=None, updates=None) -> None:
        """Puts a step's rows into the window (newest first) and adapts
        alpha (`nopeek_adapt`), once the step is applied: a step recomputed
        (asynchronous steps) counts once, and `applied` False (a boolean
        tensor: an update skipped on overflow) leaves both as they were.
        `updates`: the client optimizer's updates before this one (for the
        warm-up)."""
        if term is None:
            return
        if self._alpha is not None:
            self._adapt(term.dcor, applied, updates)
        if not self.nopeek_window:
            return
        x_memory, z_memory, filled = self._window(term.x_rows, term.z_rows)
        stored = [(x_memory, term.x_rows), (z_memory, term.z_rows)]
        if self.nopeek_reencode:  # its cut tensors are encoded again
            stored = stored[:1]
        for memory, rows in stored:
            rows = tf.stop_gradient(tf.cast(rows, memory.dtype))
            new = tf.concat([rows, memory], 0)[: self.nopeek_window]
            memory.assign(new if applied is None else tf.where(applied, new, memory))
        more = tf.minimum(filled + tf.shape(term.x_rows)[0], self.nopeek_window)
        filled.assign(more if applied is None else tf.where(applied, more, filled))

    def _past_warmup(self, updates):
        """True (a boolean tensor, or True) once `updates` reach
        `nopeek_warmup`."""
        if not self.nopeek_warmup or updates is None:
            return True
        return updates >= self.nopeek_warmup

    def _adapt(self, dcor, applied, updates) -> None:
        """alpha x exp(nopeek_adapt x (dcor - target)), within its bounds (a
        non-finite estimate leaves it)."""
        dcor = tf.cast(dcor, tf.float32)
        exponent = self.nopeek_adapt * (dcor - self.nopeek_target)
        exponent = tf.where(tf.math.is_finite(dcor), exponent, 0.0)
        exponent *= tf.cast(self._past_warmup(updates), tf.float32)
        alpha = tf.clip_by_value(
            self._alpha * tf.exp(exponent),
            self.nopeek_alpha,
            ADAPT_MAX * self.nopeek_alpha,
        )
        self._alpha.assign(
            alpha if applied is None else tf.where(applied, alpha, self._alpha)
        )

    def _windowed_dcor(self, x_rows, z_rows) -> tf.Tensor:
        """dCor of the batch's rows together with the window's."""
        if not self.nopeek_window:
            return distance_correlation(x_rows, z_rows)
        x_memory, z_memory, filled = self._window(x_rows, z_rows)
        return distance_correlation(
            tf.concat([x_rows, x_memory[:filled]], 0),
            tf.concat([z_rows, z_memory[:filled]], 0),
        )

    def _reencoded_dcor(self, x, x_rows, z_rows, encode) -> tf.Tensor:
        """dCor of the batch's and the window's inputs and their cut tensors
        as the current client encodes them, all in inference mode (so that
        batch norm or dropout treat every row alike)."""
        if encode is None:
            raise ValueError(
                "nopeek_reencode needs the client's encoder: "
                "protect_activations(..., encode=...)"
            )
        inputs = tf.nest.flatten(x)
        if len(inputs) != 1:
            raise ValueError(
                "nopeek_reencode encodes the window's inputs with the client: "
                "it needs a client of one input tensor"
            )
        (single,) = inputs
        if None in single.shape[1:]:
            raise ValueError(
                f"nopeek_reencode needs inputs of a static shape, got "
                f"{single.shape}: set nopeek_reencode=False"
            )
        x_memory, _, filled = self._window(x_rows, z_rows)
        rows = tf.concat([x_rows, x_memory[:filled]], 0)
        # The batch is encoded with the window: the client never sees an
        # empty batch (oneDNN's max-pool gradient aborts on one).
        shape = [-1] + [int(d) for d in single.shape[1:]]
        batch = tf.cast(tf.reshape(rows, shape), single.dtype)
        encoded = encode(tf.nest.pack_sequence_as(x, [batch]))
        return distance_correlation(rows, flat_batch(encoded))

    def _window(self, x_rows, z_rows):
        """The window's variables, made (outside any graph) at first use."""
        if self._memory is None:
            widths = [rows.shape[1] for rows in (x_rows, z_rows)]
            if None in widths:
                raise ValueError(
                    "nopeek_window needs inputs and cut tensors of static "
                    f"shapes; got {widths[0]} and {widths[1]} features per "
                    "example: set nopeek_window=0"
                )
            with tf.init_scope():
                self._memory = tuple(
                    tf.Variable(tf.zeros([self.nopeek_window, width]), trainable=False)
                    for width in widths
                ) + (tf.Variable(0, trainable=False),)
        return self._memory

    def protect_gradients(self, gradients, labels=None, num_classes=None) -> list:
        """Output gradients as sent to the server: Marvell-style noise
        (from `labels`, the classes the client trains with, of
        `num_classes` if known), then clipped and/or noised.

        Raises:
          ValueError: `marvell_strength` is set and `labels` is None.
        """
        gradients = self._marvell(list(gradients), labels, num_classes)
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

    def _marvell(self, gradients, labels, num_classes) -> list:
        """The gradients with Marvell-style noise, computed on all of them
        as one [n, features] matrix per example."""
        if not self.marvell_strength:
            return gradients
        if labels is None:
            raise ValueError(
                f"marvell_strength={self.marvell_strength:g} needs the labels "
                "the gradients come from: protect_gradients(gradients, labels)"
            )
        sizes = [tf.reduce_prod(tf.shape(g)[1:]) for g in gradients]
        noised = marvell_noise(
            flat_batch(gradients),
            labels,
            self.marvell_strength,
            self._seeds,
            num_classes,
        )
        parts = tf.split(noised, tf.stack(sizes), axis=1)
        return [
            tf.reshape(tf.cast(p, g.dtype), tf.shape(g))
            for p, g in zip(parts, gradients)
        ]


def from_config(config, client_id: int = 0) -> ClientPrivacy | None:
    """The `ClientPrivacy` of `config.privacy`, or None when every defense is off.

    `client_id` seeds the noise apart per client process (gRPC), so that no
    two clients draw the same noise.

    Raises:
      ValueError: `marvell_strength` is set in a topology where the label
        holder sends no gradients (neither U-shaped nor vertical).
    """
    p = config.privacy
    if p.marvell_strength and config.topology not in MARVELL_TOPOLOGIES:
        raise ValueError(
            f"config.privacy.marvell_strength={p.marvell_strength:g} protects "
            "the gradients a label holder sends: use config.topology "
            f"'ushaped' or 'vertical', not {config.topology!r} (there the "
            "server receives the labels)"
        )
    if p.hijack_probe_every:
        _check_guard(config)
    privacy = ClientPrivacy(
        nopeek_alpha=float(p.nopeek_alpha),
        nopeek_step=str(p.nopeek_step),
        nopeek_window=int(p.nopeek_window),
        nopeek_reencode=bool(p.nopeek_reencode),
        nopeek_target=float(p.nopeek_target),
        nopeek_warmup=int(p.nopeek_warmup),
        nopeek_adapt=float(p.nopeek_adapt),
        activation_noise=float(p.activation_noise),
        gradient_max_norm=float(p.gradient_max_norm),
        gradient_noise=float(p.gradient_noise),
        hijack_probe_every=int(p.hijack_probe_every),
        hijack_warmup=int(p.hijack_warmup),
        hijack_threshold=float(p.hijack_threshold),
        hijack_probes=int(p.hijack_probes),
        hijack_fraction=float(p.hijack_fraction),
        hijack_freeze=bool(p.hijack_freeze),
        marvell_strength=float(p.marvell_strength),
        seed=int(config.seed) * 10007 + int(client_id),
    )
    return privacy if privacy.active else None


def _check_guard(config) -> None:
    """The hijack guard probes whole steps of a label-holding client."""
    where = f"config.privacy.hijack_probe_every={config.privacy.hijack_probe_every}"
    if config.topology not in GUARD_TOPOLOGIES:
        raise ValueError(
            f"{where} probes the steps of a client that holds the labels: use "
            f"config.topology 'vanilla' or 'ushaped', not {config.topology!r}"
        )
    p = config.privacy
    if p.label_epsilon or p.marvell_strength:
        # Measured on an honest server (docs/privacy.md): randomized labels
        # are often wrong already, and Marvell's noise swamps the norms.
        raise ValueError(
            f"{where} compares the server's gradients for wrong and right "
            "labels; beside config.privacy.label_epsilon or marvell_strength "
            "it raised false alarms on an honest server (docs/privacy.md): "
            "turn those off or the guard off"
        )
    train = config.train
    if train.get("microbatches", 1) > 1 or train.get("max_staleness", 0) > 0:
        raise ValueError(
            f"{where} probes steps that wait for their gradients: set "
            "config.train.microbatches=1 and config.train.max_staleness=0"
        )


def _nonzero(x):
    """x, with 0 replaced by 1 (for a divisor whose numerator is then 0)."""
    return tf.where(x > 0.0, x, tf.ones_like(x))


def _dense(gradient):
    """A gradient as a dense tensor (IndexedSlices densified)."""
    return tf.convert_to_tensor(gradient)
