"""The learning rate of each epoch (`config.train.lr_schedule`).

Every party's optimizer gets the same rate, set at the start of each epoch
(and again when a run resumes), so the rate depends on the epoch alone:
whichever schedule, transport or client counts, and whatever the number of
steps an optimizer took. Schedules:

- "constant": `learning_rate` throughout;
- "step": multiplied by `lr_decay_factor` at each epoch of `lr_decay_epochs`
  (AlexNet's and ResNet's recipe: x0.1 at epochs such as 30, 60, 90);
- "cosine": from `learning_rate` down along half a cosine over the epochs
  after the warm-up.

`warmup_epochs` = W ramps the rate up linearly first: epoch e < W trains at
`learning_rate * (e + 1) / (W + 1)` (the gradual warm-up that large batches
need when the rate is scaled with the batch).
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "apply", "for_epoch", "is_constant", "start_epoch"]

SCHEDULES = ("constant", "step", "cosine")


def for_epoch(train, epoch: int) -> float:
    """The learning rate of `epoch` (0-based) under `config.train`.

    Raises:
      ValueError: an unknown schedule, or settings out of range.
    """
    base = float(train.learning_rate)
    name, warmup = _settings(train)
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown config.train.lr_schedule {name!r}; choose one of "
            f"{', '.join(SCHEDULES)}"
        )
    if not 0 <= warmup < int(train.epochs):
        raise ValueError(
            f"config.train.warmup_epochs={warmup} must be in [0, "
            f"config.train.epochs={train.epochs})"
        )
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    if name == "step":
        drops = sum(1 for e in _decay_epochs(train) if e <= epoch)
        return base * float(train.get("lr_decay_factor", 0.1)) ** drops
    if name == "cosine":
        progress = (epoch - warmup) / (int(train.epochs) - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def is_constant(train) -> bool:
    """True when every epoch trains at `config.train.learning_rate`."""
    return _settings(train) == ("constant", 0)


def apply(optimizers, rate: float) -> None:
    """Sets every optimizer's learning rate (loss scale wrappers included)."""
    for optimizer in optimizers:
        optimizer.learning_rate = rate


def start_epoch(train, optimizers, epoch: int) -> float | None:
    """Gives `optimizers` the rate of `epoch` and returns it; None (and
    nothing set) when the rate is constant."""
    if is_constant(train):
        return None
    rate = for_epoch(train, epoch)
    apply(optimizers, rate)
    return rate


def _settings(train) -> tuple[str, int]:
    """(schedule name, warm-up epochs) of `config.train`."""
    name = train.get("lr_schedule", "constant") or "constant"
    return name, int(train.get("warmup_epochs", 0) or 0)


def _decay_epochs(train) -> list[int]:
    text = str(train.get("lr_decay_epochs", "") or "")
    try:
        epochs = sorted(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        epochs = []
    if not epochs or epochs[0] < 1:
        raise ValueError(
            "config.train.lr_schedule='step' needs config.train.lr_decay_epochs: "
            f"comma-separated epochs >= 1 such as '30,60,90'; got {text!r}"
        )
    return epochs
