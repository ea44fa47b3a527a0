"""Leakage measured during training: dCor(raw inputs, what the server gets).

On a fixed evaluation set (the first `config.privacy.leakage_examples` test
examples, so every run of a config measures the same inputs) the client's
cut tensors, as they would be sent (inference mode, plus the activation
noise if that defense is on), are compared with the raw inputs by distance
correlation: 1 means the server could recover a function of the input up to
a similarity transform, 0 means independence.

It also says when the figure misleads. A client whose cut output is the same
for every input ("collapsed", e.g. every ReLU dead) scores dCor 0, yet the
server learns nothing from it; and NoPeek that has not moved dCor at least
`NOT_MOVED` below the untrained client's gives no protection. Each is a
warning in the log and in the summary's `privacy_warnings`.

Vertical runs (each party holds a strip of the features) measure, for each
party k without the labels, `leakage_dcor_k` (its strip against its cut
tensors; `leakage_dcor_change_k` against its untrained segment's, and its
warnings, NoPeek's not-moved one included) and `label_leak_norm_auc_k` /
`label_leak_cosine_auc_k`: Li et al.'s attacks on the gradients the server
would send it (the server's segment and loss on the fixed examples, with
the server's Marvell-style noise when `config.privacy.marvell_strength` is
on).

With `config.privacy.reconstruction_examples` = N > 0, a run ends with the
reconstruction attack on its newest client (`Leakage.reconstruction`): a
decoder trained on the first N training examples' cut outputs as sent
decodes the `leakage_examples` test examples after the fixed set; the grid,
SSIM and MSE go to TensorBoard (`<workdir>/attacks`) and
`reconstructions.png`, the figures to the summary.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from splitkeras import data as data_lib
from splitkeras.privacy.attacks.label_leakage import label_leakage
from splitkeras.privacy.attacks.reconstruction import reconstruction_report
from splitkeras.privacy.defenses import flat_batch, from_config
from splitkeras.privacy.distance_correlation import distance_correlation
from splitkeras.privacy.label_dp import training_labels
from splitkeras.privacy.marvell import marvell_noise, num_classes_of
from splitkeras.protocol import flat

__all__ = [
    "NEAR_CHANCE",
    "NOT_MOVED",
    "EvaluationLeak",
    "Leakage",
    "attach_privacy",
    "clients_of",
    "guard_report",
    "images_of",
    "near_chance_warning",
    "privacy_warnings",
    "vertical_label_leak",
]

log = logging.getLogger("splitkeras")

# NoPeek "has not moved" the client while leakage_dcor is less than this
# fraction below the untrained client's.
NOT_MOVED = 0.1
# A cut output "is the same for every input" when no feature spreads over
# more than this fraction of its largest magnitude (at least 1).
_COLLAPSED = 1e-6
# With NoPeek on, test accuracy below this multiple of chance (1 / classes)
# means the client took the task down with the leakage.
NEAR_CHANCE = 1.5
# The randomized labels of the fixed examples are drawn apart from any party's.
_NOT_A_PARTY = "leakage examples"
# Measuring draws its noise (activation noise, Marvell's) from generators of
# its own, seeded this far from the run's: it does not shift the training
# draws, and a host's measurement draws what the run in one process does.
_MEASUREMENT_SEED = 7919


def near_chance_warning(accuracy, num_classes: int, nopeek_alpha: float) -> list:
    """The warning of a NoPeek run whose accuracy fell to near chance (a
    client whose output still varies but tells the server almost nothing
    about the task: its low leakage_dcor comes with nothing learned), or
    nothing."""
    if not nopeek_alpha or accuracy is None or num_classes < 2:
        return []
    chance = 1.0 / num_classes
    if accuracy >= NEAR_CHANCE / num_classes:
        return []
    return [
        f"NoPeek (config.privacy.nopeek_alpha={nopeek_alpha:g}) left the model "
        f"near chance: accuracy {accuracy:.3f} against {chance:.3f} for "
        f"{num_classes} classes, so the client's low leakage comes with "
        "nothing learned; lower nopeek_alpha or set config.privacy.nopeek_target"
    ]


def privacy_warnings(cut_rows, dcor: float, start, nopeek_alpha: float) -> list:
    """What a leakage figure hides, as one-line warnings (may be empty).

    Args:
      cut_rows: the clean cut tensors of the fixed examples, [examples,
        features] (before any activation noise).
      dcor: leakage_dcor measured now.
      start: leakage_dcor of the untrained client, or None.
      nopeek_alpha: the client's NoPeek strength (0: off).
    """
    cut_rows = np.asarray(cut_rows, np.float64)
    spread = float(np.ptp(cut_rows, axis=0).max()) if cut_rows.size else 0.0
    scale = max(1.0, float(np.abs(cut_rows).max())) if cut_rows.size else 1.0
    if spread <= _COLLAPSED * scale:
        hint = (
            f"lower config.privacy.nopeek_alpha (now {nopeek_alpha:g})"
            if nopeek_alpha
            else "check the learning rate and the client's activations"
        )
        return [
            f"the client has collapsed: its cut output is the same for all "
            f"{len(cut_rows)} leakage examples, so the server learns nothing "
            f"from the inputs (leakage_dcor {dcor:.3f} here is not privacy); " + hint
        ]
    if nopeek_alpha and start and dcor > (1.0 - NOT_MOVED) * start:
        return [
            f"NoPeek is on (config.privacy.nopeek_alpha={nopeek_alpha:g}) but "
            f"leakage_dcor {dcor:.3f} is {100 * (dcor / start - 1):+.0f}% from "
            f"the untrained client's {start:.3f} (not {100 * NOT_MOVED:.0f}% "
            "lower): the cut leaks about as much as without it; raise "
            "nopeek_alpha or train longer"
        ]
    return []


def guard_report(clients) -> tuple[dict, list]:
    """The hijack guards' figures (of clients that have probed: client 0's
    unsuffixed, the others' with `_<k>`) and their alarms' warnings."""
    figures, warnings = {}, []
    for client in clients:
        guard = client.privacy.guard if client.privacy is not None else None
        if guard is None or guard.score() is None:
            continue
        suffix = f"_{client.client_id}" if client.client_id else ""
        figures["hijack_score" + suffix] = guard.score()
        if guard.lowest_score() is not None:
            figures["hijack_lowest_score" + suffix] = guard.lowest_score()
        if guard.alarm() is not None:
            figures["hijack_alarm_step" + suffix] = guard.alarm()
        warnings += guard.warnings()
    return figures, warnings


def clients_of(trainer) -> list:
    """The `Client` parties of a SplitModel or a schedule (may be empty)."""
    if hasattr(trainer, "clients"):
        return list(trainer.clients)
    client = getattr(trainer, "client", None)
    return [] if client is None else [client]


def _adapted_alpha(client) -> dict:
    """{"nopeek_adapted_alpha": the alpha `nopeek_adapt` reached}, or {}."""
    alpha = None if client.privacy is None else client.privacy.adapted_alpha
    return {} if alpha is None else {"nopeek_adapted_alpha": alpha}


def _newest_client(trainer):
    """The client whose segment the server would see next."""
    clients = clients_of(trainer)
    if not clients:
        return None
    return clients[getattr(trainer, "active", 0)]


def attach_privacy(trainer, config) -> None:
    """Gives every client of `trainer` the defenses of `config.privacy`."""
    if from_config(config) is None:
        return
    clients = clients_of(trainer)
    if not clients:
        raise ValueError(
            f"config.privacy defenses need client segments; config.method="
            f"{config.method!r} has none"
        )
    for client in clients:
        # Each client's noise is its own (seeded by its id), as in a process
        # of its own.
        client.privacy = from_config(config, client.client_id)


class Leakage:
    """Measures `leakage_dcor` of a trainer's newest client segment.

    Args:
      config: the experiment config (`config.privacy.leakage_examples`; 0
        turns the measurement off).
      arrays: the dataset; its first test examples are the fixed set.
      strips: vertical runs: every party's aligned site (`arrays` is then
        the label owner's); without them a vertical run measures nothing.
    """

    def __init__(self, config, arrays, strips=None):
        # Streams (imagenet2012) have no fixed test arrays: nothing measured.
        available = len(arrays.x_test) if hasattr(arrays, "x_test") else 0
        n = min(int(config.privacy.leakage_examples), available)
        self.vertical = config.topology == "vertical"
        self.enabled = n > 0 and (not self.vertical or strips is not None)
        self.y = self.y_trained = None
        if self.enabled:
            # A site without labels (a vertical party's own) measures dCor
            # only: zeros just give its batches their shape.
            labels = arrays.y_test
            y = labels[:n] if labels is not None else np.zeros(n, np.int64)
            self.x, y_batch = next(iter(data_lib.eval_dataset(arrays.x_test[:n], y, n)))
            # Vertical: each party's strip of the same n examples.
            self.strips = [
                next(iter(data_lib.eval_dataset(s.x_test[:n], y, n)))[0]
                for s in strips or ()
            ]
            if labels is not None:
                self.y = y_batch
                # Under label DP the client's gradients come from randomized
                # labels (drawn apart from the training ones); the attack is
                # scored against the true ones.
                self.y_trained = training_labels(
                    config, y_batch.numpy(), int(arrays.num_classes), party=_NOT_A_PARTY
                )
        self._num_classes = int(getattr(arrays, "num_classes", 0))
        # The reconstruction attack at the end of the run (opt-in): a decoder
        # trained on the first training examples' cut outputs, measured on
        # the test examples after the fixed set.
        self.aux = self.held_out = None
        m = int(config.privacy.reconstruction_examples)
        held_out = arrays.x_test[n : 2 * n] if self.enabled else ()
        if m and len(held_out) and not self.vertical and hasattr(arrays, "x_train"):
            m = min(m, len(arrays.x_train))
            self.aux = images_of(arrays.x_train[:m], arrays.y_train[:m])
            self.held_out = images_of(held_out, arrays.y_test[n : 2 * n])
        self._decoder_epochs = int(config.privacy.reconstruction_epochs)
        self._seed = int(config.seed)
        # Per-example gradients at the scale of a training batch's mean loss.
        self._batch_size = int(config.train.batch_size)
        self._noises = {}  # per client id: a copy of its activation noise
        self._marvell_seeds = keras.random.SeedGenerator(
            int(config.seed) + _MEASUREMENT_SEED
        )
        self.start = None  # leakage_dcor of the untrained client
        self.starts = {}  # vertical: of each party without the labels, by k
        self.warnings = []  # the last measurement's privacy_warnings
        self.found = []  # those of them about the leakage (not the guard's)

    def measure_start(self, trainer) -> None:
        """Measures the untrained client's leakage_dcor (before any step;
        vertical: each party's without the labels)."""
        client = _newest_client(trainer) if self.enabled else None
        if client is None:
            return
        if not self.vertical:
            self.start = self._dcor(client)[0]
            return
        for k, (party, x) in enumerate(zip(trainer.clients, self.strips)):
            if k != trainer.server.label_client:
                self.party_start(party, k, x)

    def party_start(self, client, k: int, x=None) -> None:
        """`measure_start` of vertical party k (on its strip `x`; default:
        the fixed examples of a party's own site, in a process of its own)."""
        if self.enabled:
            self.starts[k] = self._dcor(client, x)[0]

    def summary(self) -> dict:
        """The summary's fields: the start figure and the last warnings."""
        if not (self.enabled or self.warnings):
            return {}
        fields = {"privacy_warnings": list(self.warnings)}
        if self.start is not None:
            fields["leakage_dcor_start"] = self.start
        for k, start in self.starts.items():
            fields[f"leakage_dcor_start_{k}"] = start
        return fields

    def __call__(self, trainer, accuracy=None, server_outputs=None) -> dict:
        """{"leakage_dcor": value, ...}, or {} when there is nothing to
        measure; logs the warnings of `privacy_warnings` (or, given the
        figures' test `accuracy`, `near_chance_warning`) and of the clients'
        hijack guards (`hijack_score`, and `hijack_alarm_step` once the alarm
        went off; client 0's unsuffixed, the others' with `_<k>`).

        `server_outputs(cut tensors)` -> the server's outputs for them (a
        U-shaped client over gRPC asks its host); by default the trainer's
        server segment computes them."""
        logs, guard = guard_report(clients_of(trainer))
        self.found = []
        client = _newest_client(trainer) if self.enabled else None
        if client is not None and self.vertical:
            logs.update(self._vertical(trainer.clients, trainer.server))
        elif client is not None:
            if server_outputs is None:
                server_outputs = _segment_outputs(getattr(trainer, "server", None))
            logs.update(self._leakage(client, accuracy, server_outputs))
        self._warn(guard)
        return logs

    def party(self, client, k: int) -> dict:
        """Vertical party k (without the labels) in a process of its own:
        {"leakage_dcor_<k>": dCor of its strip of the fixed examples and its
        cut tensors, "leakage_dcor_change_<k>" (after `party_start`)}, as
        `__call__` measures them with every party in one process; logs its
        warnings. The label-leak AUCs need the labels and the server's
        gradients of every party's cut: its host scores them
        (`EvaluationLeak`)."""
        self.found = []
        logs = {}
        if self.enabled:
            value, _, clean = self._dcor(client)
            logs = self._party_figures(k, client, value, clean)
        self._warn([])
        return logs

    def _warn(self, guard) -> None:
        """The last measurement's warnings: the guard's, then `found`."""
        self.warnings = guard + self.found
        for warning in self.warnings:
            log.warning("Privacy: %s", warning)

    def _leakage(self, client, accuracy=None, server_outputs=None) -> dict:
        """leakage_dcor (+ its change, + U-shaped label leakage when the
        server's outputs can be had) of `client`; adds its
        `privacy_warnings`, else a `near_chance_warning`."""
        value, cut, clean = self._dcor(client)
        logs = {"leakage_dcor": value, **_adapted_alpha(client)}
        if self.start:
            logs["leakage_dcor_change"] = value / self.start - 1.0
        alpha = client.privacy.nopeek_alpha if client.privacy is not None else 0.0
        found = privacy_warnings(flat_batch(clean), value, self.start, alpha)
        self.found += found or near_chance_warning(accuracy, self._num_classes, alpha)
        if client.tail is not None and server_outputs is not None:
            logs.update(self._label_leakage(client, server_outputs(cut)))
        return logs

    def reconstruction(self, trainer, run_dir: str, step: int) -> dict:
        """With `config.privacy.reconstruction_examples` set: the
        reconstruction attack on the newest client as the run ends (what
        its server receives; `reconstruction_report` writes the grid and
        figures under `run_dir`): {"reconstruction_ssim", "reconstruction_mse"},
        or {} (off, vertical, several cut tensors)."""
        client = _newest_client(trainer) if self.aux is not None else None
        if client is None or len(client.segment.outputs) != 1:
            return {}

        def sent(x, training=False):
            return self._as_sent(client, flat(client.segment(x, training=training)))[0]

        attack = reconstruction_report(
            sent,
            self.aux,
            self.held_out,
            run_dir,
            step,
            epochs=self._decoder_epochs,
            seed=self._seed,
        )
        return {
            "reconstruction_ssim": attack["ssim"],
            "reconstruction_mse": attack["mse"],
        }

    def _as_sent(self, client, cut) -> tuple:
        """`client`'s cut tensors as its server would see them: with its
        activation noise, from a generator of its own so that measuring does
        not shift the training noise."""
        if client.privacy is None or not client.privacy.activation_noise:
            return tuple(cut)
        if client.client_id not in self._noises:
            self._noises[client.client_id] = dataclasses.replace(
                client.privacy, seed=client.privacy.seed + _MEASUREMENT_SEED
            )
        return self._noises[client.client_id].noised(cut)

    def _cut(self, client, x):
        """(the cut tensors as sent, the clean cut tensors) of `client` on x."""
        clean = flat(client.segment(x, training=False))
        return self._as_sent(client, clean), clean

    def _dcor(self, client, x=None):
        """(leakage_dcor, the cut tensors as sent, the clean cut tensors) of
        `client` on `x` (default: the fixed examples)."""
        x = self.x if x is None else x
        cut, clean = self._cut(client, x)
        value = distance_correlation(flat_batch(x), flat_batch(cut))
        return float(value), cut, clean

    def _vertical(self, clients, server) -> dict:
        """Each party k without the labels: leakage_dcor_k and the leak AUCs
        of the gradients the server would send it."""
        logs, cuts = {}, []
        for k, (client, x) in enumerate(zip(clients, self.strips)):
            if k == server.label_client:  # its cut for the merge, no dCor
                cuts.append(self._cut(client, x)[0][0])
                continue
            value, cut, clean = self._dcor(client, x)
            cuts.append(cut[0])
            logs.update(self._party_figures(k, client, value, clean))
        logs.update(
            vertical_label_leak(
                server,
                cuts,
                self.y,
                self.y_trained,
                self._batch_size,
                self._marvell_seeds,
            )
        )
        return logs

    def _party_figures(self, k, client, value, clean) -> dict:
        """Vertical party k's leakage_dcor_k (and its change against its
        start); adds its `privacy_warnings` to `found`."""
        logs = {f"leakage_dcor_{k}": value}
        logs.update({f"{name}_{k}": v for name, v in _adapted_alpha(client).items()})
        start = self.starts.get(k)
        if start:
            logs[f"leakage_dcor_change_{k}"] = value / start - 1.0
        alpha = client.privacy.nopeek_alpha if client.privacy is not None else 0.0
        for warning in privacy_warnings(flat_batch(clean), value, start, alpha):
            self.found.append(f"party {k}: {warning}")
        return logs

    def _label_leakage(self, client, outputs) -> dict:
        """U-shaped: what the server's output gradients tell about the labels.

        The gradients of the loss (of the labels the client trains with:
        randomized under label DP) with respect to the server's outputs, at
        the scale of a training batch's mean loss and as the client would
        send them (after its gradient protection), scored by Li et al.'s
        norm and cosine attacks for one class against the rest (class 0:
        binary, as in their setting). `outputs`: the server's outputs for
        the client's cut tensors of the fixed examples.
        """
        outputs = [tf.convert_to_tensor(o) for o in outputs]
        with tf.GradientTape() as tape:
            tape.watch(outputs)
            y_pred = client.tail(outputs[0] if len(outputs) == 1 else outputs)
            loss = _batch_scaled_loss(self.y_trained, y_pred, self._batch_size)
        grads = tape.gradient(loss, outputs)
        if client.privacy is not None:
            grads = client.privacy.protect_gradients(
                grads, self.y_trained, num_classes_of(client.tail)
            )
        aucs = label_leakage(flat_batch(grads).numpy(), np.equal(self.y, 0))
        return {f"label_leak_{k}": float(v) for k, v in aucs.items()}


def _batch_scaled_loss(y_trained, y_pred, batch_size: int) -> tf.Tensor:
    """The summed loss of these examples over a training batch's size: its
    gradients per example are those of a training batch's mean loss."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    n = tf.cast(tf.shape(y_pred)[0], tf.float32)
    return loss_fn(y_trained, y_pred) * n / batch_size


def vertical_label_leak(server, cuts, y, y_trained, batch_size, seeds) -> dict:
    """{"label_leak_norm_auc_k", "label_leak_cosine_auc_k"} of each party k
    without the labels: Li et al.'s attacks on the gradients a vertical
    `server` would send it for these examples.

    Args:
      server: the `VerticalServer` (its segment, merge, label owner and
        Marvell-style noise).
      cuts: every party's cut tensor of the same examples, in party order.
      y: their true labels (the attacks are scored against them).
      y_trained: the labels the server trains with (randomized under label
        DP).
      batch_size: a training batch's size: the gradients are at the scale of
        its mean loss.
      seeds: a `keras.random.SeedGenerator` of the measurement's own, for the
        Marvell-style noise (measuring does not shift the server's).
    """
    cuts = [tf.convert_to_tensor(c) for c in cuts]
    with tf.GradientTape() as tape:
        tape.watch(cuts)
        y_pred = server.segment(server.merged(cuts), training=False)
        loss = _batch_scaled_loss(y_trained, y_pred, batch_size)
    grads = tape.gradient(loss, cuts)
    logs = {}
    for k, g in enumerate(grads):
        if k == server.label_client:
            continue
        if server.marvell_strength:
            classes = num_classes_of(server.segment)
            g = marvell_noise(g, y_trained, server.marvell_strength, seeds, classes)
        aucs = label_leakage(flat_batch(g).numpy(), np.equal(y, 0))
        logs.update({f"label_leak_{a}_{k}": float(v) for a, v in aucs.items()})
    return logs


class EvaluationLeak:
    """A vertical host's `label_leak_*_k` figures, from the evaluation.

    Over gRPC no process holds every party's strip of the fixed examples:
    the host does get, in each round's evaluation, every party's cut
    tensors of the test rows (by row number) and the labels. It keeps those
    of the first `config.privacy.leakage_examples` rows (the fixed
    examples, as `Leakage` picks them in one process) and at the round's
    end scores the gradients its server would send each party without the
    labels for them (`vertical_label_leak`). They are the cut tensors as
    sent for evaluation: with activation noise on, the party's own draws,
    not those `Leakage` makes in one process; with a lossy codec, as
    decoded. Like `Leakage`'s, its generator of Marvell-style noise is not
    checkpointed: a resumed host draws anew.

    Args:
      config: the experiment config.
      server: the host's `VerticalServer`.
    """

    def __init__(self, config, server):
        self.server = server
        self.examples = int(config.privacy.leakage_examples)
        self._config = config
        self._batch_size = int(config.train.batch_size)
        # As `Leakage`'s: the same draws when measured at the same rounds.
        self._seeds = keras.random.SeedGenerator(int(config.seed) + _MEASUREMENT_SEED)
        self._rows = {}  # row number -> ([cut row per party], label)

    def record(self, messages) -> None:
        """Keeps the fixed examples' rows of one EVALUATE step (one message
        per party, in party order, the label owner's with the labels)."""
        ids = np.asarray(messages[0].ids)
        y = np.asarray(messages[self.server.label_client].labels)
        cuts = [np.asarray(m.tensors[0]) for m in messages]
        for i in np.flatnonzero(ids < self.examples):
            self._rows[int(ids[i])] = ([c[i] for c in cuts], y[i])

    def forget(self) -> None:
        self._rows.clear()

    def figures(self) -> dict:
        """The AUCs of the rows kept since the last call ({} if none)."""
        rows = self._rows
        if not rows:
            return {}
        order = sorted(rows)
        parties = zip(*(rows[i][0] for i in order))
        cuts = [np.stack(party) for party in parties]
        y = np.array([rows[i][1] for i in order])
        y_trained = training_labels(
            self._config, y, self.server.num_classes, party=_NOT_A_PARTY
        )
        figures = vertical_label_leak(
            self.server, cuts, y, y_trained, self._batch_size, self._seeds
        )
        self._rows = {}
        return figures


def _segment_outputs(server):
    """`server_outputs` of a server party in this process (or None)."""
    if server is None:
        return None

    def outputs(cut):
        cut = cut[0] if len(cut) == 1 else list(cut)
        return tf.nest.flatten(server.segment(cut, training=False))

    return outputs


def images_of(x, y):
    """The inputs x as the input pipeline gives them (floats, scaled)."""
    return next(iter(data_lib.eval_dataset(x, y, len(x))))[0].numpy()
