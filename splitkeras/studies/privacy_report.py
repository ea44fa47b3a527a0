"""The privacy report: accuracy against measured leakage, per defense setting
and cut point.

For each cut (the config's, or several given) and each setting (NoPeek
alpha, or Gaussian noise on the activations) it trains the config's split
with `experiment.train_and_evaluate`, then measures what the server could
learn from the trained client segment:

- `leakage_dcor`: dCor(raw inputs, sent activations) on the fixed
  evaluation set (see `splitkeras.privacy.leakage`);
- a reconstruction attack: an honest-but-curious server holding
  `aux_examples` (input, activation) pairs from the training set trains a
  decoder, then decodes the activations of `eval_examples` held-out test
  inputs (not the leakage set): MSE and SSIM of the reconstructions, and a
  PNG grid of originals over reconstructions;
- label inference by model completion (Fu et al. 2022): a party that sees
  what the client sends (the server: in a U-shaped split it holds no
  labels) and knows `known_per_class` labelled examples of each class (from
  the auxiliary set) trains a head on their cut outputs (as sent, noise
  included) and labels the held-out inputs: its accuracy, the label
  information in the cut output.

It writes `report.md` (a table), `report.json` and `report.png` (test
accuracy and reconstruction SSIM against dCor leakage) in the workdir, and
the accuracy-dCor Pareto frontier over every run's epochs (`frontier`: each
epoch's test accuracy and dCor leakage, from the run's validation figures in
TensorBoard) in `report.md`, `report.json` and `pareto.png`.
"""

from __future__ import annotations

import copy
import json
import os
from typing import NamedTuple

import tensorflow as tf

from splitkeras import builders, experiment
from splitkeras import data as data_lib
from splitkeras.checkpointing import party_checkpoint
from splitkeras.cut import cut
from splitkeras.privacy.attacks.model_completion import (
    known_examples,
    model_completion_attack,
)
from splitkeras.privacy.attacks.reconstruction import reconstruction_report
from splitkeras.privacy.defenses import from_config
from splitkeras.privacy.leakage import images_of
from splitkeras.studies.pareto import epoch_figures, nondominated

__all__ = [
    "AttackSets",
    "AttackedRun",
    "attack_sets",
    "completion_accuracy",
    "frontier",
    "images_of",
    "privacy_report",
    "restore_client_segment",
    "restore_server_segment",
    "settings",
    "train_and_attack",
]


def settings(alphas, noises) -> list[dict]:
    """The defense settings of a sweep: each alpha (no noise), then each noise."""
    rows = [{"nopeek_alpha": float(a), "activation_noise": 0.0} for a in alphas]
    rows += [{"nopeek_alpha": 0.0, "activation_noise": float(s)} for s in noises]
    return rows


def restore_client_segment(config, workdir, arrays):
    """The trained client segment of a single-client split run in `workdir`."""
    segments = cut(builders.build_model(config, arrays), builders.cut_layers(config))
    _restore([segments.client, segments.tail], workdir, "client_0")
    return segments.client


def restore_server_segment(config, workdir, arrays):
    """The trained server segment (U-shaped: the middle) of a single-client
    split run in `workdir`."""
    segments = cut(builders.build_model(config, arrays), builders.cut_layers(config))
    _restore([segments.server], workdir, "server")
    return segments.server


def _restore(models, workdir, party):
    directory = os.path.join(workdir, "checkpoints", party)
    latest = tf.train.latest_checkpoint(directory)
    if latest is None:
        raise FileNotFoundError(f"no {party} checkpoint under {directory}")
    party_checkpoint(models).restore(latest).expect_partial()


def _as_sent(segment, privacy):
    """What the server receives for x: the segment's output (+ the noise)."""
    if privacy is None or not privacy.activation_noise:
        return segment

    def sent(x, training=False):
        return privacy.noised([segment(x, training=training)])[0]

    return sent


class AttackSets(NamedTuple):
    """The data of the attacks."""

    arrays: object  # the dataset
    aux: object  # the attacker's inputs: the first training examples
    held_out: object  # test inputs after the leakage set, to attack
    held_out_labels: object
    known: object  # rows of `aux` whose labels the attacker knows


def attack_sets(config, aux_examples, eval_examples, known_per_class) -> AttackSets:
    """The `AttackSets` of `config`'s dataset."""
    arrays = data_lib.load(config.data.name, config.data.path, config.data.download)
    aux = images_of(arrays.x_train[:aux_examples], arrays.y_train[:aux_examples])
    start = int(config.privacy.leakage_examples)  # held out from the leakage set
    stop = start + eval_examples
    held_out = images_of(arrays.x_test[start:stop], arrays.y_test[start:stop])
    known = known_examples(arrays.y_train[:aux_examples], known_per_class, config.seed)
    return AttackSets(arrays, aux, held_out, arrays.y_test[start:stop], known)


def completion_accuracy(sent, sets: AttackSets, seed: int) -> float:
    """Model completion's label accuracy on the held-out inputs, from what
    the server receives (`sent`) and the attacker's known labels."""
    return model_completion_attack(
        sent,
        sets.aux[sets.known],
        sets.arrays.y_train[sets.known],
        sets.held_out,
        sets.held_out_labels,
        int(sets.arrays.num_classes),
        seed=seed,
    )


class AttackedRun(NamedTuple):
    """A trained run and the reconstruction attack on what its server gets."""

    summary: dict  # the run's summary.json
    segment: object  # the trained client segment
    sent: object  # x -> what the server receives (the segment, + noise)
    attack: dict | None  # reconstruction_attack's; None: several cut tensors


def train_and_attack(
    config, run_dir: str, sets: AttackSets, decoder_epochs: int = 20
) -> AttackedRun:
    """Trains `config`'s single-client split in `run_dir`, restores its client
    segment and attacks what the server receives: a decoder trained on the
    `sets.aux` inputs' activations, measured on `sets.held_out` (MSE, SSIM),
    and `reconstructions.png` in `run_dir`."""
    summary = experiment.train_and_evaluate(config, run_dir)
    segment = restore_client_segment(config, run_dir, sets.arrays)
    sent = _as_sent(segment, from_config(config))
    if len(segment.outputs) != 1:
        return AttackedRun(summary, segment, sent, None)
    # Beside the run's own figures in TensorBoard, at its last step.
    attack = reconstruction_report(
        sent,
        sets.aux,
        sets.held_out,
        run_dir,
        int(summary.get("steps", 0)),
        epochs=decoder_epochs,
        seed=config.seed,
    )
    return AttackedRun(summary, segment, sent, attack)


def _name(setting, cut_spec=None) -> str:
    name = f"alpha{setting['nopeek_alpha']:g}_noise{setting['activation_noise']:g}"
    return name if cut_spec is None else f"cut_{cut_spec}_{name}"


def privacy_report(
    config,
    workdir: str,
    alphas=(0.0, 0.01, 0.1, 0.5, 1.0),
    noises=(0.5, 1.0),
    cuts=(),
    aux_examples: int = 1000,
    eval_examples: int = 512,
    decoder_epochs: int = 20,
    known_per_class: int = 4,
) -> list[dict]:
    """Trains and attacks one run per cut and setting; writes the report and
    the accuracy-dCor Pareto frontier over cuts, settings and epochs; returns
    the rows. `cuts`: the cut points to compare (empty: the config's)."""
    if config.num_clients != 1 or config.method != "split":
        raise ValueError("the privacy report runs single-client splits (method split)")
    if cuts and config.topology != "vanilla":
        raise ValueError(
            f"cuts compares single cut points of vanilla splits; for "
            f"config.topology={config.topology!r} set config.model.cut and "
            "leave cuts empty"
        )
    cuts = list(cuts) or [config.model.cut]
    os.makedirs(workdir, exist_ok=True)
    sets = attack_sets(config, aux_examples, eval_examples, known_per_class)
    rows = []
    for cut_spec in cuts:
        for setting in settings(alphas, noises):
            c = copy.deepcopy(config)
            c.model.cut = cut_spec
            c.privacy.nopeek_alpha = setting["nopeek_alpha"]
            c.privacy.activation_noise = setting["activation_noise"]
            run_dir = os.path.join(
                workdir, _name(setting, cut_spec if len(cuts) > 1 else None)
            )
            run = train_and_attack(c, run_dir, sets, decoder_epochs)
            if run.attack is None:
                raise ValueError(
                    f"the privacy report attacks one cut tensor; cut "
                    f"{c.model.cut!r} sends several"
                )
            summary, attack = run.summary, run.attack
            completion = completion_accuracy(run.sent, sets, c.seed)
            figures = epoch_figures(run_dir, ("accuracy", "leakage_dcor"))
            rows.append(
                {
                    "cut": cut_spec,
                    **setting,
                    "test_accuracy": summary["test_accuracy"],
                    "leakage_dcor": summary["leakage_dcor"],
                    "reconstruction_mse": attack["mse"],
                    "reconstruction_ssim": attack["ssim"],
                    "completion_accuracy": completion,
                    "epochs": {
                        str(epoch): {
                            "test_accuracy": f["accuracy"],
                            "leakage_dcor": f["leakage_dcor"],
                        }
                        for epoch, f in figures.items()
                    },
                }
            )
            _write(workdir, config, rows)
    return rows


def frontier(rows) -> list[dict]:
    """The accuracy-dCor Pareto frontier over every row's epochs: the points
    (cut, setting, epoch) that no other point beats on both test accuracy
    (higher) and dCor leakage (lower), by dCor."""
    points = [
        {
            "cut": r["cut"],
            "nopeek_alpha": r["nopeek_alpha"],
            "activation_noise": r["activation_noise"],
            "epoch": int(epoch),
            **figures,
        }
        for r in rows
        for epoch, figures in r["epochs"].items()
    ]
    front = nondominated(points, lambda p: (-p["test_accuracy"], p["leakage_dcor"]))
    return sorted(front, key=lambda p: (p["leakage_dcor"], -p["test_accuracy"]))


def _write(workdir, config, rows):
    front = frontier(rows)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump({"rows": rows, "pareto": front}, f, indent=2)
    cuts = list(dict.fromkeys(r["cut"] for r in rows))
    lines = [
        f"Model {config.model.name} cut at {', '.join(cuts)}, "
        f"{config.train.epochs} epochs, seed {config.seed}; leakage on the first "
        f"{config.privacy.leakage_examples} test examples; each change is "
        "against the first row of the same cut.",
        "",
        "| cut | NoPeek alpha | activation noise | test accuracy | change (points) "
        "| dCor leakage | change | reconstruction MSE | reconstruction SSIM "
        "| model-completion label accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["cut"] == r["cut"])
        change = r["leakage_dcor"] / base["leakage_dcor"] - 1
        lines.append(
            f"| {r['cut']} | {r['nopeek_alpha']:g} | {r['activation_noise']:g} | "
            f"{r['test_accuracy']:.4f} | "
            f"{100 * (r['test_accuracy'] - base['test_accuracy']):+.2f} | "
            f"{r['leakage_dcor']:.3f} | {100 * change:+.0f}% | "
            f"{r['reconstruction_mse']:.4f} | {r['reconstruction_ssim']:.3f} | "
            f"{r['completion_accuracy']:.3f} |"
        )
    points = sum(len(r["epochs"]) for r in rows)
    lines += [
        "",
        f"Pareto frontier: of the {points} (cut, setting, epoch) points, those "
        "no other beats on both test accuracy after that epoch and dCor "
        "leakage (pareto.png).",
        "",
        "| cut | NoPeek alpha | activation noise | epoch | test accuracy "
        "| dCor leakage |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['cut']} | {p['nopeek_alpha']:g} | {p['activation_noise']:g} | "
        f"{p['epoch']} | {p['test_accuracy']:.4f} | {p['leakage_dcor']:.3f} |"
        for p in front
    ]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(workdir, rows)
    _plot_frontier(workdir, rows, front)


def _plot(workdir, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        label = (
            f"alpha {r['nopeek_alpha']:g}"
            if r["activation_noise"] == 0
            else f"noise {r['activation_noise']:g}"
        )
        marker = "o" if r["activation_noise"] == 0 else "s"
        axes[0].scatter(r["leakage_dcor"], r["test_accuracy"], marker=marker)
        axes[0].annotate(label, (r["leakage_dcor"], r["test_accuracy"]), fontsize=8)
        axes[1].scatter(r["leakage_dcor"], r["reconstruction_ssim"], marker=marker)
        axes[1].annotate(
            label, (r["leakage_dcor"], r["reconstruction_ssim"]), fontsize=8
        )
    axes[0].set(xlabel="dCor(raw input, sent activations)", ylabel="test accuracy")
    axes[1].set(
        xlabel="dCor(raw input, sent activations)", ylabel="reconstruction SSIM"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("NoPeek (circles) and activation noise (squares)")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "report.png"), dpi=120)
    plt.close(fig)


def _plot_frontier(workdir, rows, front):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, cut_spec in enumerate(dict.fromkeys(r["cut"] for r in rows)):
        points = [
            (f["leakage_dcor"], f["test_accuracy"])
            for r in rows
            if r["cut"] == cut_spec
            for f in r["epochs"].values()
        ]
        ax.scatter(*zip(*points), s=14, alpha=0.5, color=f"C{n}", label=cut_spec)
    ax.step(
        [p["leakage_dcor"] for p in front],
        [p["test_accuracy"] for p in front],
        where="post",
        color="k",
        label="frontier",
    )
    for p in front:
        label = (
            f"a{p['nopeek_alpha']:g} e{p['epoch']}"
            if not p["activation_noise"]
            else f"n{p['activation_noise']:g} e{p['epoch']}"
        )
        ax.annotate(label, (p["leakage_dcor"], p["test_accuracy"]), fontsize=7)
    ax.set(
        xlabel="dCor(raw input, sent activations)",
        ylabel="test accuracy after the epoch",
        title="Every cut, setting and epoch (a: NoPeek alpha, n: noise, e: epoch)",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "pareto.png"), dpi=120)
    plt.close(fig)
