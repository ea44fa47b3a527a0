"""Split inference on a device: a test split sent batch by batch (PREDICT),
the accuracy of the logits that come back, and the latency per batch.
numpy only."""

from __future__ import annotations

import numpy as np

from splitkeras.edge.client import eval_batches

__all__ = ["split_inference"]


def split_inference(client, x, y, batch_size: int, batches: int = 0, warmup: int = 0):
    """Sends the first `batches` batches of (x, y) for split inference.

    Every batch sent counts for the accuracy and the logits; the first
    `warmup` are left out of the latency figures only (the first calls set
    up the interpreter and the connection).

    Args:
      client: an `EdgeClient` (its `predict`, `timings`, `latency_ms`).
      x, y: the examples and their labels.
      batch_size: examples per PREDICT message.
      batches: batches to send (0: all of (x, y)).
      warmup: the first batches not timed.

    Returns:
      (summary, logits): summary holds examples, batches, timed_batches,
      accuracy (of the server's first output's argmax) and the latency
      medians / 90th percentiles in ms (`EdgeClient.latency_ms`); logits
      are those of every example sent, in order.
    """
    kept, correct = [], 0
    for i, (xb, yb) in enumerate(eval_batches(x, y, batch_size)):
        if batches and i >= batches:
            break
        if i == warmup:
            client.timings.clear()  # the warm-up calls are not timed
        logits = client.predict(xb)[0]
        kept.append(logits)
        correct += int(np.sum(np.argmax(logits, axis=-1) == yb))
    if len(kept) <= warmup:
        client.timings.clear()
    examples = sum(len(logits) for logits in kept)
    summary = {
        "batch_size": batch_size,
        "examples": examples,
        "batches": len(kept),
        "timed_batches": len(client.timings),
        "accuracy": correct / max(examples, 1),
        **client.latency_ms(),
    }
    return summary, (np.concatenate(kept) if kept else np.zeros((0,)))
