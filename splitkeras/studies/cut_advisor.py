"""The cut-point advisor: what each valid cut costs the client and leaks.

For every valid single cut of a config's model (`cut.cut_points`), one row
(`CutRow`), one function per column:

- `client_parameters`: trainable weights of the client segment;
- `client_forward_flops`: the client segment's forward FLOPs per example
  (`accounting.flops.count_flops`);
- `bytes_per_example`: float32 bytes of the cut tensors up
  (`accounting.bandwidth.cut_bytes_per_example`) and of their gradients
  down (the same size);
- `litert_latency_ms`: the client segment exported as the project exports
  it (`export.export_segment`, inference only, float32), run by the LiteRT
  interpreter (`edge.runtime.LiteSegment`) at batch 1: the median of
  several invocations, in milliseconds, on this machine;
- a short training of the split at that cut and a reconstruction attack on
  it (`studies.privacy_report.train_and_attack`, as the privacy report
  does per defense setting): the run's `leakage_dcor` and the attack's
  SSIM and MSE (NaN for a cut with several cut tensors).

`pareto` finds the cuts no other cut beats on every chosen column,
`recommend` the cut that meets the user's budgets with the lowest dCor.
`advise` does it all and writes `advisor.md`, `advisor.json` and
`advisor.png` (dCor against bytes and against client FLOPs, Pareto-optimal
cuts marked) in the workdir.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time

import numpy as np

from splitkeras.studies.pareto import nondominated

__all__ = [
    "BUDGETS",
    "CutRow",
    "Recommendation",
    "advise",
    "bytes_per_example",
    "client_forward_flops",
    "client_parameters",
    "litert_latency_ms",
    "markdown_table",
    "pareto",
    "plot",
    "recommend",
    "static_row",
    "write",
]

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class CutRow:
    """One cut's costs and leakage (per example; NaN: not measured)."""

    cut: str
    client_params: int  # trainable weights of the client segment
    client_flops: int  # forward FLOPs of the client segment per example
    bytes_up: int  # float32 cut tensors, client -> server
    bytes_down: int  # their gradients, server -> client
    latency_ms: float = NAN  # LiteRT client segment, batch 1, median
    dcor: float = NAN  # dCor(raw inputs, cut activations) after training
    ssim: float = NAN  # reconstruction attack's SSIM (1: perfect)
    mse: float = NAN  # reconstruction attack's MSE
    test_accuracy: float = NAN  # of the short training

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The budgets: (flag of `advise-cut` and keyword of `recommend`, CutRow field
# it bounds); bytes per example bounds the bytes up (down is the same size).
BUDGETS = (
    ("max_dcor", "dcor"),
    ("max_bytes_per_example", "bytes_up"),
    ("max_client_flops", "client_flops"),
    ("max_latency_ms", "latency_ms"),
)


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The recommended cut (None if no cut meets the budgets) and why."""

    cut: str | None
    message: str


def client_parameters(client) -> int:
    """Trainable weights (elements) of the client segment."""
    return int(sum(math.prod(w.shape) for w in client.trainable_weights))


def client_forward_flops(client) -> int:
    """The client segment's forward FLOPs per example."""
    from splitkeras.accounting.flops import count_flops

    return int(count_flops(client, input_gradient=False).forward)


def bytes_per_example(model, at: str) -> tuple[int, int]:
    """(bytes up, bytes down) per example: the float32 cut tensors and their
    gradients, which have the same shapes."""
    from splitkeras.accounting.bandwidth import cut_bytes_per_example

    up = int(cut_bytes_per_example(model, at))
    return up, up


def static_row(model, at: str) -> CutRow:
    """The columns of a cut that need no training or export."""
    from splitkeras.cut import cut

    client = cut(model, at).client
    up, down = bytes_per_example(model, at)
    return CutRow(
        cut=at,
        client_params=client_parameters(client),
        client_flops=client_forward_flops(client),
        bytes_up=up,
        bytes_down=down,
    )


def litert_latency_ms(
    client, out_dir: str, repeats: int = 50, threads: int | None = 1, sample=None
) -> float:
    """Median milliseconds of one LiteRT invocation of `client` at batch 1.

    The segment is exported as `splitkeras export` exports it for inference
    (`export_segment(..., training=False)`, float32, no quantized variants)
    into `out_dir`; its `client.tflite` then runs `repeats` times (after
    two warm-up calls) on one example.

    Args:
      client: the client segment (float32, one input).
      out_dir: where the export is written.
      repeats: timed invocations (0: NaN, nothing exported).
      threads: the interpreter's threads (None: LiteRT's default).
      sample: one input example with its batch axis (None: uniform noise).
    """
    if repeats <= 0:
        return NAN
    import keras

    from splitkeras.edge.runtime import LiteSegment
    from splitkeras.export import export_segment

    x = None if sample is None else np.asarray(sample, np.float32)[:1]
    export_segment(
        client,
        keras.optimizers.SGD(),  # not exported: inference only
        out_dir,
        training=False,
        quantize=(),
        sample=x,
    )
    lite = LiteSegment(os.path.join(out_dir, "client.tflite"), num_threads=threads)
    if x is None:
        x = np.random.default_rng(0).uniform(size=[1, *lite.input_shape])
        x = x.astype(np.float32)
    for _ in range(2):
        lite.serve(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        lite.serve(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def pareto(rows, keys=("dcor", "bytes_up")) -> list[str]:
    """The cuts no other row dominates on `keys` (all minimized), in order;
    equal rows do not dominate each other, NaN is the worst value."""
    front = nondominated(rows, lambda r: [getattr(r, k) for k in keys])
    return [r.cut for r in front]


def _meets(value: float, limit: float) -> bool:
    return not limit or (not math.isnan(value) and value <= limit)


def _g(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"{value}"


def _limit(value: float) -> str:
    """A budget as given: 20000, not 2e+04."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def recommend(
    rows,
    max_dcor: float = 0.0,
    max_bytes_per_example: float = 0.0,
    max_client_flops: float = 0.0,
    max_latency_ms: float = 0.0,
) -> Recommendation:
    """The cut with the lowest dCor among those that meet every budget.

    A budget of 0 is no budget; a measurement that is missing (NaN) does not
    meet a budget. Ties in dCor go to fewer bytes per example. If no cut
    meets them, the message (one line) names each budget that fails for
    every cut (with the best value any cut has), or, if each budget is met
    by some cut but no cut meets all, what each cut fails.
    """
    limits = {
        "max_dcor": max_dcor,
        "max_bytes_per_example": max_bytes_per_example,
        "max_client_flops": max_client_flops,
        "max_latency_ms": max_latency_ms,
    }
    rows = list(rows)
    if not rows:
        return Recommendation(None, "no cut to recommend: no rows")

    def fails(row):
        return [
            flag
            for flag, field in BUDGETS
            if not _meets(getattr(row, field), limits[flag])
        ]

    meeting = [r for r in rows if not fails(r)]
    if meeting:
        best = min(
            meeting,
            key=lambda r: (
                (math.isnan(r.dcor), 0 if math.isnan(r.dcor) else r.dcor)
                + (r.bytes_up,)
            ),
        )
        return Recommendation(
            best.cut,
            f"recommended cut: {best.cut} (dCor {_g(best.dcor)}, "
            f"{best.bytes_up} bytes up per example, {best.client_flops} client "
            f"FLOPs, {_g(best.latency_ms)} ms LiteRT); {len(meeting)} of "
            f"{len(rows)} cuts meet the budgets",
        )
    everywhere = []
    for flag, field in BUDGETS:
        if limits[flag] and all(flag in fails(r) for r in rows):
            known = [r for r in rows if not math.isnan(getattr(r, field))]
            if known:
                top = min(known, key=lambda r, f=field: getattr(r, f))
                best = f"best {_g(getattr(top, field))} at {top.cut}"
            else:
                best = "not measured for any cut"
            everywhere.append(
                f"--{flag}={_limit(limits[flag])} fails for every cut ({best})"
            )
    if everywhere:
        return Recommendation(
            None, "no cut meets the budgets: " + "; ".join(everywhere)
        )
    each = ", ".join(f"{r.cut} fails {'+'.join(fails(r))}" for r in rows)
    return Recommendation(
        None, f"no cut meets every budget at once (each is met by some cut): {each}"
    )


_COLUMNS = (
    ("cut", "cut"),
    ("client params", "client_params"),
    ("client FLOPs/example", "client_flops"),
    ("bytes up/example", "bytes_up"),
    ("bytes down/example", "bytes_down"),
    ("LiteRT ms/example", "latency_ms"),
    ("dCor", "dcor"),
    ("recon. SSIM", "ssim"),
    ("test acc.", "test_accuracy"),
)


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows) -> str:
    """The rows as a markdown table; the last column marks the Pareto cuts
    (B: of dCor and bytes up, F: of dCor and client FLOPs)."""
    by_bytes = set(pareto(rows, ("dcor", "bytes_up")))
    by_flops = set(pareto(rows, ("dcor", "client_flops")))
    lines = [
        "| " + " | ".join(h for h, _ in _COLUMNS) + " | Pareto |",
        "|" + "---|" * (len(_COLUMNS) + 1),
    ]
    for r in rows:
        marks = ("B" if r.cut in by_bytes else "") + ("F" if r.cut in by_flops else "")
        cells = [_cell(getattr(r, f)) for _, f in _COLUMNS]
        lines.append("| " + " | ".join(cells) + f" | {marks} |")
    return "\n".join(lines)


def plot(rows, path: str, recommended: str | None = None, title: str = "") -> str:
    """Writes a PNG: dCor against bytes up and against client FLOPs per
    example, each point labelled by its cut, each panel's Pareto-optimal
    cuts filled and joined, the recommended cut starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        (axes[0], "bytes_up", "bytes up per example (float32 cut tensors)"),
        (axes[1], "client_flops", "client forward FLOPs per example"),
    )
    for ax, field, label in panels:
        front = set(pareto(rows, ("dcor", field)))
        points = {}  # cuts at the same point share one label
        for r in rows:
            if not math.isnan(r.dcor):
                points.setdefault((getattr(r, field), r.dcor), []).append(r.cut)
        for (x, y), names in points.items():
            on = any(name in front for name in names)
            ax.scatter(
                x,
                y,
                s=36,
                facecolor="tab:red" if on else "none",
                edgecolor="tab:red" if on else "tab:gray",
                zorder=3,
            )
            if recommended in names:
                ax.scatter(x, y, s=220, marker="*", color="gold", zorder=2)
            ax.annotate(
                " = ".join(names),
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        line = sorted(
            (getattr(r, field), r.dcor)
            for r in rows
            if r.cut in front and not math.isnan(r.dcor)
        )
        if line:
            ax.plot(*zip(*line), color="tab:red", lw=1, alpha=0.6)
        if min((getattr(r, field) for r in rows), default=0) > 0:
            ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="dCor(raw input, cut activations)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        (title + "\n" if title else "")
        + "filled red: Pareto-optimal (lower dCor and cost); star: recommended",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(
    workdir: str, rows, recommendation: Recommendation, header: str, title: str = ""
) -> None:
    """advisor.json, advisor.md and advisor.png (titled `title`) in `workdir`."""
    with open(os.path.join(workdir, "advisor.json"), "w") as f:
        json.dump(
            {
                "about": header,
                "rows": [r.as_dict() for r in rows],
                "pareto_dcor_bytes": pareto(rows, ("dcor", "bytes_up")),
                "pareto_dcor_flops": pareto(rows, ("dcor", "client_flops")),
                "recommended": recommendation.cut,
                "message": recommendation.message,
            },
            f,
            indent=2,
        )
    text = f"{header}\n\n{markdown_table(rows)}\n\n{recommendation.message}\n"
    with open(os.path.join(workdir, "advisor.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(workdir, "advisor.png"), recommendation.cut, title)


def _header(config, arrays, cuts, steps, latency_repeats, threads) -> str:
    training = f"{steps} steps" if steps else f"{config.train.epochs} epochs"
    path = config.data.get("path", None)
    source = f"{config.data.name} ({path})" if path else config.data.name
    kwargs = dict(config.model.get("kwargs", {})) or "defaults"
    return (
        f"Model {config.model.name} ({kwargs}) "
        f"on {source}: {len(arrays.x_train)} training and {len(arrays.x_test)} "
        f"test examples of shape {tuple(arrays.input_shape)}; each cut trained "
        f"{training} (batch {config.train.batch_size}, {config.train.optimizer} "
        f"lr {config.train.learning_rate:g}, seed {config.seed}); dCor on the "
        f"first {config.privacy.leakage_examples} test examples; LiteRT: "
        f"median of {latency_repeats} invocations at batch 1, "
        f"{threads or 'default'} interpreter thread(s). {len(cuts)} cuts. "
        "Pareto: B = of dCor and bytes up, F = of dCor and client FLOPs."
    )


def advise(
    config,
    workdir: str,
    cuts=None,
    *,
    train_steps: int = 300,
    aux_examples: int = 1000,
    eval_examples: int = 512,
    decoder_epochs: int = 20,
    latency_repeats: int = 50,
    latency_threads: int | None = 1,
    budgets: dict | None = None,
) -> tuple[list[CutRow], Recommendation]:
    """Measures every cut, writes the advisor's files, recommends a cut.

    Args:
      config: a single-client vanilla split config; its `model.cut` is set to
        each cut in turn.
      workdir: where each cut's run (`cut_<name>/`) and the files go.
      cuts: the cuts to measure (None: every valid single cut).
      train_steps: `config.train.max_steps` of each run (0: the config's
        epochs).
      aux_examples: the attacker's training inputs (from the training set).
      eval_examples: held-out test inputs it reconstructs (after the
        leakage set).
      decoder_epochs: the attack decoder's epochs.
      latency_repeats: LiteRT invocations timed per cut (0: not measured).
      latency_threads: LiteRT interpreter threads (None: its default).
      budgets: `recommend`'s keyword arguments.

    Returns:
      The rows, in graph order, and the recommendation.
    """
    from splitkeras import builders
    from splitkeras.cut import cut_points
    from splitkeras.studies.privacy_report import attack_sets, train_and_attack

    if config.num_clients != 1 or config.method != "split":
        raise ValueError(
            "the cut advisor runs single-client splits (method split, "
            f"num_clients 1); got method {config.method!r}, num_clients "
            f"{config.num_clients}"
        )
    if config.topology != "vanilla":
        raise ValueError(
            f"the cut advisor tries single cuts (topology vanilla); got "
            f"{config.topology!r}"
        )
    os.makedirs(workdir, exist_ok=True)
    sets = attack_sets(config, aux_examples, eval_examples, known_per_class=0)
    arrays = sets.arrays
    model = builders.build_model(config, arrays)
    valid = cut_points(model)
    cuts = list(valid if not cuts else cuts)
    unknown = [c for c in cuts if c not in valid]
    if unknown:
        raise ValueError(
            f"not valid cuts of {config.model.name}: {', '.join(unknown)}; "
            f"valid cuts: {', '.join(valid)}"
        )
    header = _header(
        config, arrays, cuts, train_steps, latency_repeats, latency_threads
    )
    training = (
        f"{train_steps} steps" if train_steps else f"{config.train.epochs} epochs"
    )
    title = f"{config.model.name} on {config.data.name}, each cut trained {training}"
    rows = []
    for at in cuts:
        c = copy.deepcopy(config)
        c.model.cut = at
        if train_steps:
            c.train.max_steps = int(train_steps)
        run_dir = os.path.join(workdir, f"cut_{at}")
        row = static_row(builders.build_model(c, arrays), at)
        run = train_and_attack(c, run_dir, sets, decoder_epochs)
        attack = run.attack or {"ssim": NAN, "mse": NAN}
        measured = {
            "dcor": float(run.summary.get("leakage_dcor", NAN)),
            "test_accuracy": float(run.summary.get("test_accuracy", NAN)),
            "ssim": attack["ssim"],
            "mse": attack["mse"],
        }
        latency = litert_latency_ms(
            run.segment,
            os.path.join(run_dir, "litert"),
            repeats=latency_repeats,
            threads=latency_threads,
            sample=sets.held_out[:1],
        )
        rows.append(dataclasses.replace(row, latency_ms=latency, **measured))
        recommendation = recommend(rows, **(budgets or {}))
        write(workdir, rows, recommendation, header, title)
    return rows, recommend(rows, **(budgets or {}))
