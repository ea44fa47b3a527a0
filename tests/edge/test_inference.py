"""split_inference (`splitkeras predict`): the accuracy counts every batch
sent, the warm-up batches are left out of the latency only."""

import numpy as np

from splitkeras.edge.inference import split_inference
from tests import base


class _Predictor:
    """Stands for an EdgeClient: logits that pick class x[:, 0]."""

    def __init__(self):
        self.timings, self.sent = [(9.0, 9.0)], 0  # an earlier call's timing

    def predict(self, x):
        self.sent += 1
        self.timings.append((0.001 * self.sent, 0.002))
        return [np.eye(3, dtype=np.float32)[x[:, 0].astype(int)]]

    def latency_ms(self):  # as EdgeClient's: nothing when nothing was timed
        if not self.timings:
            return {}
        return {"device_ms_p50": float(np.median([t[0] for t in self.timings]) * 1e3)}


class SplitInferenceTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.y = np.array([0, 1, 2, 0, 1, 2, 0])
        self.x = self.y[:, None].astype(np.float32).repeat(2, axis=1)
        self.x[[1, 4], 0] = 0  # two wrong predictions, in batches 0 and 1

    def test_every_batch_counts_and_warmup_is_not_timed(self):
        predictor = _Predictor()
        summary, logits = split_inference(predictor, self.x, self.y, 3, warmup=1)
        self.assertEqual(predictor.sent, 3)  # batches=0: all (3 + 3 + 1)
        self.assertEqual((summary["batches"], summary["examples"]), (3, 7))
        self.assertEqual(summary["accuracy"], 5 / 7)
        self.assertEqual(logits.shape, (7, 3))
        self.assertEqual(summary["timed_batches"], 2)
        self.assertAlmostEqual(summary["device_ms_p50"], 2.5)  # calls 2 and 3

    def test_the_first_batches_only(self):
        predictor = _Predictor()
        summary, logits = split_inference(predictor, self.x, self.y, 3, batches=1)
        self.assertEqual((summary["examples"], summary["timed_batches"]), (3, 1))
        self.assertEqual(summary["accuracy"], 2 / 3)
        np.testing.assert_array_equal(np.argmax(logits, -1), [0, 0, 2])
        # Warm-up longer than the run: nothing timed, accuracy still counted.
        summary, _ = split_inference(_Predictor(), self.x, self.y, 3, 2, warmup=5)
        self.assertEqual((summary["timed_batches"], summary["examples"]), (0, 6))
