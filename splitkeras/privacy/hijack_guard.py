"""A client's detector of a training-hijacking server, after SplitGuard.

A server that hijacks the client's training (Pasquini et al., "Unleashing
the Tiger", CCS 2021: feature-space hijacking) sends gradients that push the
client's cut output towards a feature space of its own choosing, which it
can invert; those gradients do not depend on the labels. An honest server's
do. SplitGuard (Erdogan et al., WPES 2022) turns this into a test the
client can run: now and then it trains on a batch whose labels it has
randomized (a "probe") and compares the gradients that come back with the
regular ones.

`HijackGuard` is our version. After `warmup` steps, every `probe_every`-th
step is a probe: the batch's labels are shuffled among its examples (the
label histogram is unchanged, so the server cannot tell a probe from the
sent labels alone), the client sends it as usual and does not apply what
comes back. For a model that has learned something, an honest server's
gradients for wrong labels are much larger than for right ones; a hijacker's
are the same. Each probe's ratio is the mean per-example norm of its cut
gradients over the running mean (EMA) of the regular steps'; the score is
the mean ratio of the last `probes` probes, and the guard raises its alarm
when that score falls below `threshold`.

It differs from SplitGuard: SplitGuard sends fake batches at random with a
probability, also compares gradient directions and maps its score through a
function with tuned constants; we probe on a fixed schedule and compare
norms only. A hijacker that runs an honest model beside its attack could
tell probes apart and answer them honestly: like SplitGuard, this detects a
server that hijacks, not one that also knows it is being tested.

The cost: a probe step is a step the client does not learn from, and an
honest server learns from the shuffled labels once every `probe_every`
steps (docs/privacy.md measures the accuracy cost).
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["HijackGuard", "hijack_warning"]

# Weight of the newest regular step in the running mean of regular norms.
_EMA = 0.1


def hijack_warning(step: int, score: float, threshold: float, probes: int) -> str:
    """The alarm's one-line warning."""
    return (
        f"the server may be hijacking this client's training: since step "
        f"{step}, its gradients for batches with shuffled labels were below "
        f"{threshold:g}x the regular ones over {probes} probes (an honest "
        f"server's are larger; now {score:.2f}x); stop sending to this server"
    )


class HijackGuard:
    """Probes the server with label-shuffled batches (see the module docstring).

    Args:
      probe_every: a probe every this many steps after the warm-up (>= 2).
      warmup: regular steps before the first probe (the model must have
        learned something for wrong labels to stand out).
      threshold: the alarm goes off when the score (probe norm / regular
        norm, averaged over the last `probes` probes) is below this.
      probes: probes in the score; no alarm before this many.
      seed: seeds the label shuffles.
    """

    def __init__(
        self,
        probe_every: int = 10,
        warmup: int = 20,
        threshold: float = 1.5,
        probes: int = 5,
        seed: int = 0,
    ):
        if probe_every < 2:
            raise ValueError(f"probe_every must be >= 2, got {probe_every}")
        if warmup < 1 or probes < 1:
            raise ValueError(f"warmup and probes must be >= 1, got {warmup}, {probes}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.probe_every, self.warmup = int(probe_every), int(warmup)
        self.threshold, self.probes = float(threshold), int(probes)
        self._seeds = keras.random.SeedGenerator(seed)
        with tf.init_scope():
            self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.regular = tf.Variable(0.0, trainable=False)  # EMA of regular norms
            self.ratios = tf.Variable(tf.zeros([self.probes]), trainable=False)
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False)  # probes
            # The step after which the alarm first went off (-1: never); it
            # stays on.
            self.alarm_step = tf.Variable(-1, dtype=tf.int64, trainable=False)
            # The lowest score of `probes` probes so far (how close an honest
            # server came to the threshold).
            self.lowest = tf.Variable(float("inf"), trainable=False)

    def is_probe(self) -> tf.Tensor:
        """Whether the coming step is a probe (a boolean tensor)."""
        after = self.steps - self.warmup
        return tf.logical_and(after >= 0, after % self.probe_every == 0)

    def labels(self, y, probe):
        """The labels to train on: `y`, or (a probe) `y` shuffled."""
        shuffled = keras.random.shuffle(y, axis=0, seed=self._seeds)
        return tf.where(probe, shuffled, y)

    def record(self, probe, gradients) -> None:
        """Counts a step with the cut `gradients` it received."""
        norm = _mean_norm(gradients)
        first = tf.equal(self.regular, 0.0)
        ema = tf.where(first, norm, (1 - _EMA) * self.regular + _EMA * norm)
        self.regular.assign(tf.where(probe, self.regular, ema))
        ratio = norm / tf.maximum(self.regular, 1e-30)
        slot = self.count % self.probes
        ratios = tf.tensor_scatter_nd_update(self.ratios, [[slot]], [ratio])
        self.ratios.assign(tf.where(probe, ratios, self.ratios))
        self.count.assign_add(tf.cast(probe, tf.int64))
        self.steps.assign_add(1)
        full = self.count >= self.probes
        mean = tf.reduce_mean(self.ratios)
        self.lowest.assign(tf.where(full, tf.minimum(self.lowest, mean), self.lowest))
        low = mean < self.threshold
        first = tf.logical_and(tf.logical_and(full, low), self.alarm_step < 0)
        self.alarm_step.assign(tf.where(first, self.steps, self.alarm_step))

    def score(self) -> float | None:
        """The mean ratio of the last `probes` probes (None before the first)."""
        filled = min(int(self.count.numpy()), self.probes)
        if not filled:
            return None
        return float(tf.reduce_mean(self.ratios[:filled]).numpy())

    def lowest_score(self) -> float | None:
        """The lowest score over `probes` probes so far (None before)."""
        lowest = float(self.lowest.numpy())
        return None if lowest == float("inf") else lowest

    def alarm(self) -> int | None:
        """The step after which the alarm first went off (it stays on: the
        score of `probes` probes fell below the threshold), or None."""
        step = int(self.alarm_step.numpy())
        return None if step < 0 else step

    def warnings(self) -> list:
        """The alarm's warning, or nothing."""
        step = self.alarm()
        if step is None:
            return []
        return [hijack_warning(step, self.score(), self.threshold, self.probes)]


def _mean_norm(gradients) -> tf.Tensor:
    """The mean over examples of each example's gradient norm (all tensors)."""
    rows = [
        tf.reshape(tf.cast(g, tf.float32), [tf.shape(g)[0], -1])
        for g in tf.nest.flatten(gradients)
    ]
    rows = rows[0] if len(rows) == 1 else tf.concat(rows, axis=1)
    return tf.reduce_mean(tf.norm(rows, axis=1))
