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
step is a probe: the labels of a random `fraction` of the batch's examples
are rotated among those examples (the batch's label histogram is
unchanged, so the server cannot tell a probe from the sent labels alone),
the client sends the batch as usual and does not apply what comes back.
For a model that has learned something, an honest server's gradients for
wrong labels are much larger than for right ones; a hijacker's do not
depend on the labels. Each probe's ratio compares the two groups of the
same batch: the mean per-example norm of the cut gradients of the rotated
examples over that of the others (a hijacker's ratio is 1 in expectation
whatever its gradients do from step to step). The score is the mean ratio
of the last `probes` probes, and the guard raises its alarm when that
score falls below `threshold`.

It differs from SplitGuard: SplitGuard sends whole fake batches at random
with a probability, compares them with regular batches by gradient
direction and size, and maps its score through a function with tuned
constants; we probe on a fixed schedule and compare norms within one
batch. A hijacker that runs an honest model beside its attack could tell
the rotated labels apart and answer them honestly: like SplitGuard, this
detects a server that hijacks, not one that also knows it is being tested.

The cost: a probe step is a step the client does not learn from, and an
honest server learns from `fraction` wrong labels once every
`probe_every` steps (docs/privacy.md measures the accuracy cost).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from splitkeras.privacy.rows import flat_batch

__all__ = ["HijackGuard", "hijack_warning"]


def hijack_warning(step: int, score: float, threshold: float, probes: int) -> str:
    """The alarm's one-line warning."""
    return (
        f"the server may be hijacking this client's training: since step "
        f"{step}, its gradients for examples given wrong labels were below "
        f"{threshold:g}x those for the other examples of their batches over "
        f"{probes} probes (an honest server's are larger; now {score:.2f}x); "
        "stop sending to this server"
    )


class HijackGuard:
    """Probes the server with rotated labels (see the module docstring).

    Its state (steps, probes, scores, the alarm) is checkpointed with the
    client (`trackables`), so a resumed client keeps its schedule, its
    score and an alarm that went off; it is this client's own and is not
    handed on to the next client of a round robin.

    Args:
      probe_every: a probe every this many steps after the warm-up (>= 2).
      warmup: regular steps before the first probe (the model must have
        learned something for wrong labels to stand out).
      threshold: the alarm goes off when the score (the rotated examples'
        gradient norm over the others', averaged over the last `probes`
        probes) is below this.
      probes: probes in the score; no alarm before this many.
      fraction: the share of a probe's examples whose labels are rotated
        (at least 2 and at least 1 left; a smaller batch is not probed).
      freeze: after the alarm, the client applies no more updates from
        this server (`frozen`): it is no longer steered.
      seed: seeds the choice of examples.
    """

    def __init__(
        self,
        probe_every: int = 10,
        warmup: int = 20,
        threshold: float = 1.5,
        probes: int = 5,
        fraction: float = 0.25,
        freeze: bool = True,
        seed: int = 0,
    ):
        if probe_every < 2:
            raise ValueError(f"probe_every must be >= 2, got {probe_every}")
        if warmup < 1 or probes < 1:
            raise ValueError(f"warmup and probes must be >= 1, got {warmup}, {probes}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        self.probe_every, self.warmup = int(probe_every), int(warmup)
        self.threshold, self.probes = float(threshold), int(probes)
        self.fraction, self.freeze = float(fraction), bool(freeze)
        self._seeds = keras.random.SeedGenerator(seed)
        with tf.init_scope():
            self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.ratios = tf.Variable(tf.zeros([self.probes]), trainable=False)
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False)  # probes
            # The step after which the alarm first went off (-1: never); it
            # stays on.
            self.alarm_step = tf.Variable(-1, dtype=tf.int64, trainable=False)
            # The lowest score of `probes` probes so far (how close an honest
            # server came to the threshold).
            self.lowest = tf.Variable(float("inf"), trainable=False)

    def trackables(self) -> dict:
        """The guard's variables by name, for the client's checkpoint."""
        return {
            "steps": self.steps,
            "ratios": self.ratios,
            "count": self.count,
            "alarm_step": self.alarm_step,
            "lowest": self.lowest,
        }

    def is_probe(self) -> tf.Tensor:
        """Whether the coming step is a probe (a boolean tensor)."""
        after = self.steps - self.warmup
        return tf.logical_and(after >= 0, after % self.probe_every == 0)

    def labels(self, y, probe):
        """(The labels to train on, the rows whose labels were rotated).

        Not a probe: (`y`, no rows). A probe: a random `fraction` of the
        rows (at least 2, at least 1 left out; none in a batch under 3)
        get each other's labels, rotated by one among them; the rows whose
        label changed are returned (a row next to one of its own class
        keeps its label and is not counted). The step is a probe when some
        row changed (`record`; the client then does not apply it).
        """
        n = tf.shape(y)[0]
        k = tf.cast(tf.round(self.fraction * tf.cast(n, tf.float32)), tf.int32)
        k = tf.minimum(tf.maximum(k, 2), n - 1)
        k = tf.where(tf.logical_and(probe, n >= 3), k, 0)
        chosen = keras.random.shuffle(tf.range(n), seed=self._seeds)[:k]
        rotated = tf.roll(tf.gather(y, chosen), shift=1, axis=0)
        sent = tf.tensor_scatter_nd_update(y, chosen[:, None], rotated)
        changed = tf.not_equal(sent, y)
        if len(changed.shape) > 1:  # one-hot or [n, 1] labels
            changed = tf.reduce_any(changed, axis=list(range(1, len(changed.shape))))
        return sent, changed

    def record(self, probe, gradients, rows) -> None:
        """Counts a step with the cut `gradients` it received; `rows`: the
        rotated rows of `labels` (a probe with none is not counted)."""
        norms = tf.norm(flat_batch(gradients), axis=1)  # per example
        probe = tf.logical_and(probe, tf.reduce_any(rows))  # none in a tiny batch
        ratio = _mean(norms, rows) / tf.maximum(_mean(norms, ~rows), 1e-30)
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

    def frozen(self) -> tf.Tensor:
        """Whether the client applies no more updates (a boolean tensor)."""
        return tf.logical_and(tf.constant(self.freeze), self.alarm_step >= 0)

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


def _mean(values, rows) -> tf.Tensor:
    """The mean of `values` at `rows` (0 when there are none)."""
    weights = tf.cast(rows, values.dtype)
    return tf.reduce_sum(values * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
