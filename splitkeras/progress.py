"""A progress line every few seconds: steps/s, ETA and the latest metrics."""

from __future__ import annotations

import logging
import time

import tensorflow as tf

log = logging.getLogger("splitkeras")

__all__ = ["Progress", "write_scalars"]


class Progress:
    """Decides when to report and formats the report.

    Args:
      total_steps: the steps the whole run takes (None: not known here, e.g.
        a host without the data; lines then give no ETA).
      every_seconds: report at most this often.
      initial_step: the step the run starts (or resumes) at.
      clock: a time source, for tests.
    """

    def __init__(
        self, total_steps, every_seconds, initial_step=0, clock=time.monotonic
    ):
        self.total = total_steps
        self.every = every_seconds
        self._clock = clock
        self._last_time = clock()
        self._last_step = initial_step
        self._rate = 0.0

    def restart(self, step: int) -> None:
        """Measures rates from now on (e.g. after the first, traced, step)."""
        self._last_time, self._last_step = self._clock(), step

    def due(self, step: int) -> bool:
        """True if `every_seconds` passed since the last report, or at the end."""
        at_end = self.total is not None and step >= self.total
        return at_end or self._clock() - self._last_time >= self.every

    def report(self, step: int, logs: dict) -> None:
        """Measures steps/s since the last report and logs a progress line."""
        now = self._clock()
        self._rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        log.info(self.line(step, logs))

    def rates(self) -> dict:
        return {"steps_per_second": self._rate}

    def line(self, step: int, logs: dict) -> str:
        metrics = " ".join(f"{k} {v:.4f}" for k, v in logs.items())
        if self.total is None:
            return f"step {step} {self._rate:.1f} steps/s {metrics}"
        eta = (self.total - step) / self._rate if self._rate > 0 else float("inf")
        return (
            f"step {step}/{self.total} ({100.0 * step / self.total:.1f}%) "
            f"{self._rate:.1f} steps/s ETA {_duration(eta)} {metrics}"
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def write_scalars(writer, values: dict, step: int) -> None:
    """Writes `values` as TensorBoard scalars at `step`."""
    with writer.as_default(step=step):
        for key, value in values.items():
            tf.summary.scalar(key, value)
