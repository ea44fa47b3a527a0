"""The attack table: every defense against every attack, in one run.

Each row is a defense setting (`config.privacy` overrides). For each, the
config is trained honestly (`privacy_report.train_and_attack`) and then
attacked:

- reconstruction by an honest-but-curious server (a decoder trained on the
  auxiliary inputs' activations): SSIM on held-out inputs;
- label inference by model completion (Fu et al.) on what the client
  sends, and (U-shaped) on the server's own bottom part: what the client
  sends through the server's trained middle segment;
- U-shaped: Li et al.'s norm and cosine leak AUCs of the output gradients
  the server receives (the run's last `label_leak_*` figures; "-" for a
  vanilla split, whose server holds the labels);
- feature-space hijacking (`studies.hijacking`): a fresh client of the same
  settings (but label DP and Marvell, which the guard refuses and the
  hijacker ignores), its hijack guard on, trained for `hijack_steps` steps against
  a hijacking server that holds the auxiliary inputs: the attacker's SSIM
  on the held-out inputs at the end and at the guard's alarm, and the
  alarm's step. By default the guard only warns (`hijack_freeze` off):
  the end is what a client without a detector leaves the attacker, the
  alarm what one that stops there leaves it; with `hijack_freeze` the
  client freezes at the alarm and the end is what it leaves.

It writes attack_table.md and attack_table.json in the workdir.
"""

from __future__ import annotations

import copy
import json
import os

from splitkeras.privacy.defenses import from_config
from splitkeras.studies.hijacking import hijack
from splitkeras.studies.privacy_report import (
    attack_sets,
    completion_accuracy,
    restore_server_segment,
    train_and_attack,
)

__all__ = ["ROWS", "attack_table"]

# (name, config.privacy overrides); the last row measures the guard's cost
# on an honest server.
ROWS = (
    ("no defense", {}),
    ("NoPeek alpha 0.5", {"nopeek_alpha": 0.5}),
    ("activation noise 1", {"activation_noise": 1.0}),
    ("label DP epsilon 2", {"label_epsilon": 2.0}),
    ("Marvell strength 0.25", {"marvell_strength": 0.25}),
    ("hijack guard (honest server)", {"hijack_probe_every": 10}),
)


def attack_table(
    config,
    workdir: str,
    rows=None,
    hijack_steps: int = 600,
    hijack_probe_every: int = 10,
    hijack_freeze: bool = False,
    aux_examples: int = 1000,
    eval_examples: int = 512,
    decoder_epochs: int = 20,
    known_per_class: int = 4,
) -> list[dict]:
    """Trains and attacks each row of `rows` (numbers into ROWS; None: all).

    Returns the table's rows as dicts (also written to the workdir).
    """
    if config.num_clients != 1 or config.method != "split":
        raise ValueError("the attack table runs single-client splits (method split)")
    chosen = [ROWS[i] for i in (range(len(ROWS)) if rows is None else rows)]
    configs = []  # (the row's run, its hijacked client), checked before any run
    for name, settings in chosen:
        unknown = sorted(set(settings) - set(config.privacy))
        if unknown:
            raise ValueError(
                f"row {name!r} sets unknown config.privacy fields {unknown}"
            )
        c = copy.deepcopy(config)
        c.privacy.update(settings)
        attacked = copy.deepcopy(c)
        attacked.privacy.hijack_probe_every = hijack_probe_every
        attacked.privacy.hijack_freeze = hijack_freeze
        # The guard is refused beside these; the hijacker ignores labels
        # and the gradients sent to it, so the hijacked client's steps are
        # the same without them.
        attacked.privacy.label_epsilon = 0.0
        attacked.privacy.marvell_strength = 0.0
        for checked in (c, attacked):
            from_config(checked)  # a defense this topology refuses
        configs.append((c, attacked))
    os.makedirs(workdir, exist_ok=True)
    sets = attack_sets(config, aux_examples, eval_examples, known_per_class)
    table = []
    for (name, settings), (c, attacked) in zip(chosen, configs):
        run_dir = os.path.join(workdir, _slug(name))
        run = train_and_attack(c, run_dir, sets, decoder_epochs)
        if run.attack is None:
            raise ValueError(
                f"the attack table attacks one cut tensor; cut {c.model.cut!r} "
                "sends several"
            )
        completion = completion_accuracy(run.sent, sets, c.seed)
        middle_completion = None
        if c.topology == "ushaped":
            middle = restore_server_segment(c, run_dir, sets.arrays)
            bottom = _through(run.sent, middle)
            middle_completion = completion_accuracy(bottom, sets, c.seed)
        hijacked = hijack(attacked, sets.arrays, sets.aux, sets.held_out, hijack_steps)
        s = run.summary
        table.append(
            {
                "defense": name,
                "privacy": settings,
                "test_accuracy": s["test_accuracy"],
                "leakage_dcor": s.get("leakage_dcor"),
                "reconstruction_ssim": run.attack["ssim"],
                "completion_accuracy": completion,
                "middle_completion_accuracy": middle_completion,
                "norm_auc": s.get("label_leak_norm_auc"),
                "cosine_auc": s.get("label_leak_cosine_auc"),
                "honest_lowest_guard_score": s.get("hijack_lowest_score"),
                "honest_alarm_step": s.get("hijack_alarm_step"),
                "hijack_ssim": hijacked["ssim"],
                "hijack_ssim_at_alarm": hijacked["ssim_at_alarm"],
                "hijack_alarm_step": hijacked["alarm_step"],
                "hijack_score": hijacked["score"],
                "hijack_curve": hijacked["curve"],
            }
        )
        hijacking = (hijack_steps, hijack_probe_every, hijack_freeze)
        _write(workdir, config, hijacking, table)
    return table


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def _through(sent, middle):
    """The U-shaped server's own bottom part (Fu et al.): what the client
    sends, then the server's trained middle segment."""

    def bottom(x, training=False):
        return middle(sent(x, training=training), training=training)

    return bottom


def _figure(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _write(workdir, config, hijacking, table) -> None:
    hijack_steps, probe_every, freeze = hijacking
    with open(os.path.join(workdir, "attack_table.json"), "w") as f:
        json.dump(table, f, indent=2)
    lines = [
        f"Model {config.model.name} cut at {config.model.cut} "
        f"({config.topology}), {config.train.epochs} epochs, seed {config.seed}; "
        f"hijacking: {hijack_steps} steps, a probe every {probe_every} steps "
        f"after {config.privacy.hijack_warmup}"
        + (", the client frozen at the alarm." if freeze else "."),
        "",
        "| defense | test accuracy | dCor | reconstruction SSIM "
        "| model-completion accuracy (cut output / server's middle) "
        "| norm leak AUC | cosine leak AUC "
        + (
            f"| hijacking SSIM, frozen at the alarm (step {hijack_steps}) "
            if freeze
            else "| hijacking SSIM, no detector "
        )
        + "| hijacking SSIM, detector (at the alarm) | alarm step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['defense']} | {r['test_accuracy']:.4f} | "
            f"{_figure(r['leakage_dcor'])} | {r['reconstruction_ssim']:.3f} | "
            f"{r['completion_accuracy']:.3f} / "
            f"{_figure(r['middle_completion_accuracy'])} | {_figure(r['norm_auc'])} | "
            f"{_figure(r['cosine_auc'])} | {r['hijack_ssim']:.3f} | "
            f"{_figure(r['hijack_ssim_at_alarm'])} | "
            f"{_figure(r['hijack_alarm_step'], 'd')} |"
        )
    guarded = [r for r in table if r["honest_lowest_guard_score"] is not None]
    for r in guarded:
        alarm = r["honest_alarm_step"]
        lines += [
            "",
            f"{r['defense']}: lowest guard score on the honest server "
            f"{r['honest_lowest_guard_score']:.2f} (alarm below "
            f"{config.privacy.hijack_threshold:g}); alarm "
            + ("never." if alarm is None else f"at step {alarm:.0f}."),
        ]
    with open(os.path.join(workdir, "attack_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
