"""A step that spans two messages, run as one compiled graph.

A U-shaped server answers TRAIN with its outputs and can finish the step
only when the gradients of those outputs come back in the next message
(OUTPUT_GRADIENTS). In one process both messages travel inside the
client's compiled step, so the server's half is part of one fused graph.
Across processes each message is its own call. `PausedStep` runs the
server's half as one compiled graph in a thread of its own; the graph pauses
in its middle (a `tf.py_function`) until the second message arrives:

```
TRAIN call:             start() ──► graph: forward ──► pause(outputs) ─┐
                        ◄── outputs ◄───────────────────────────────────┘
OUTPUT_GRADIENTS call:  resume(seeds) ──► graph: backward, update ──► result
```

So a host computes what the fused in-process step computes, to the bit, and
runs the server's step as a graph instead of op by op. `cancel()` ends a
step whose second message will not come (a rollback): its graph stops
before the update.

A paused graph holds one thread of TensorFlow's inter-op pool (one per core
by default) until it goes on. So that the other steps always have a thread
to run on, at most one step fewer than the pool has threads is paused at a
time (`PausedStep.slots`); a step that finds none free waits (`NotYet`:
a host asks again shortly, after an open step has ended).
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np
import tensorflow as tf

from splitkeras.protocol import NotYet

__all__ = ["PausedStep", "StepCancelled", "inter_op_threads"]


def inter_op_threads() -> int:
    """The threads of TensorFlow's inter-op pool in this process: as
    configured, else TF_NUM_INTEROP_THREADS, else one per usable core."""
    configured = tf.config.threading.get_inter_op_parallelism_threads()
    configured = configured or int(os.environ.get("TF_NUM_INTEROP_THREADS", 0) or 0)
    return configured or len(os.sched_getaffinity(0))


class StepCancelled(RuntimeError):
    """A paused step was cancelled before its second message arrived."""


class PausedStep:
    """`fn(*args)` in a thread of its own, paused where it calls `pause`.

    Args:
      fn: the compiled step; somewhere in it a `tf.py_function` calls this
        object's `pause(outputs)` and continues with what it returns.
      args: `fn`'s arguments.

    Attributes:
      slots: the steps of this process that may be open at once (shared by
        every `PausedStep`): one fewer than the inter-op threads, at least 1.
    """

    slots = None  # made at the first step (the pool is known by then)
    _slots_lock = threading.Lock()

    def __init__(self, fn, args):
        self._fn = fn
        self._args = args
        self._outputs = queue.Queue(1)  # graph -> start(): outputs or an error
        self._seeds = queue.Queue(1)  # resume() / cancel() -> graph
        self._result = queue.Queue(1)  # graph -> resume(): result or an error
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._paused = False

    @classmethod
    def _slots(cls) -> threading.Semaphore:
        with cls._slots_lock:
            if cls.slots is None:
                cls.slots = threading.BoundedSemaphore(max(1, inter_op_threads() - 1))
            return cls.slots

    def _run(self):
        try:
            result = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._slots().release()  # before anyone hears the step ended
            if not self._paused:
                self._outputs.put(e)
            self._result.put(e)
        else:
            self._slots().release()
            self._result.put(result)

    def pause(self, outputs):
        """Called by the graph: hands `outputs` to `start()`'s caller and
        returns the seeds `resume` brings.

        Raises:
          StepCancelled: `cancel()` came instead.
        """
        self._paused = True
        # Copies: the graph goes on after the pause and may reuse the
        # buffers of its own tensors; what was handed out must not change.
        self._outputs.put([tf.constant(np.array(o, copy=True)) for o in outputs])
        seeds = self._seeds.get()
        if seeds is None:
            raise StepCancelled("the step was cancelled before its gradients came")
        return seeds

    def start(self):
        """Runs the graph up to its pause; returns the outputs it paused with.

        Raises:
          NotYet: as many steps as may be are open (ask again later).
          Exception: what the graph raised before its pause.
        """
        if not self._slots().acquire(blocking=False):
            raise NotYet(
                "every thread a paused step may hold is held by another open "
                "U-shaped step; this one starts when one of them has ended"
            )
        self._thread.start()
        outputs = self._outputs.get()
        if isinstance(outputs, BaseException):
            raise outputs
        return outputs

    def resume(self, seeds):
        """Lets the paused graph go on with `seeds`; returns its result.

        Raises:
          Exception: what the graph raised after its pause.
        """
        self._seeds.put(seeds)
        result = self._result.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def cancel(self, seconds: float = 10.0) -> None:
        """Ends a paused step without its update (waits for its thread)."""
        if self._thread.is_alive():
            try:
                self._seeds.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(seconds)
