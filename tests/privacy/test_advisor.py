"""The cut-point advisor: its columns, Pareto set, recommendation and files."""

import glob
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from splitkeras.cut import cut, cut_points
from splitkeras.studies import cut_advisor as advisor
from splitkeras.studies.cut_advisor import CutRow, pareto, recommend
from tests import base
from tests.privacy.tiny import tiny_lenet


def _model():
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(5, activation="relu", name="fc")(h)
    outputs = keras.layers.Dense(4, name="logits")(h)
    return keras.Model(inputs, outputs)


def _row(name, dcor, up, flops, latency):
    return CutRow(name, 10, flops, up, up, latency_ms=latency, dcor=dcor)


# Hand-made rows: a cheap leaky cut, a costly private one, one in between.
ROWS = [
    _row("a", 0.9, 100, 1_000, 0.1),
    _row("b", 0.5, 400, 5_000, 0.5),
    _row("c", 0.3, 300, 50_000, 2.0),
    _row("d", 0.6, 500, 2_000, 0.2),  # dominated by b on bytes, not on FLOPs
    _row("e", 0.3, 300, 60_000, 3.0),  # ties c on (dCor, bytes)
]


class ColumnsTest(base.TestCase):
    def test_parameters_flops_and_bytes_of_every_cut(self):
        model = _model()
        expected_cuts = ["conv", "pool", "flatten", "fc"]
        self.assertEqual(cut_points(model), expected_cuts)
        flops = {
            "conv": 2 * 6 * 6 * 3 * 9 * 2 + 2 * 6 * 6 * 3,  # MACs x2 + bias + relu
            "pool": 2 * 6 * 6 * 3 * 9 * 2 + 2 * 6 * 6 * 3 + 4 * 3 * 3 * 3,
        }
        for at in expected_cuts:
            row = advisor.static_row(model, at)
            client = cut(model, at).client
            self.assertEqual(row.cut, at)
            self.assertEqual(row.client_params, client.count_params())
            elements = math.prod(client.outputs[0].shape[1:])
            self.assertEqual(row.bytes_up, 4 * elements)
            self.assertEqual(row.bytes_down, row.bytes_up)
            if at in flops:
                self.assertEqual(row.client_flops, flops[at])
        self.assertEqual(advisor.static_row(model, "conv").client_params, 2 * 9 * 3 + 3)
        self.assertEqual(advisor.static_row(model, "fc").bytes_up, 4 * 5)

    def test_parameters_are_the_trainable_weights(self):
        inputs = keras.Input((4, 4, 1))
        h = keras.layers.Conv2D(2, 3, name="conv")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        outputs = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(h))
        model = keras.Model(inputs, outputs)
        row = advisor.static_row(model, "bn")
        # conv 9 * 2 + 2, bn gamma and beta 2 + 2 (its moving statistics are
        # weights too, but not trained).
        self.assertEqual(row.client_params, 24)
        self.assertEqual(cut(model, "bn").client.count_params(), 28)


class ParetoTest(base.TestCase):
    def test_pareto_sets_of_hand_made_rows(self):
        self.assertEqual(pareto(ROWS, ("dcor", "bytes_up")), ["a", "c", "e"])
        self.assertEqual(pareto(ROWS, ("dcor", "client_flops")), ["a", "b", "c", "d"])
        self.assertEqual(pareto(ROWS[:1], ("dcor", "bytes_up")), ["a"])

    def test_unmeasured_dcor_is_worst(self):
        rows = [_row("x", float("nan"), 100, 1, 1.0), _row("y", 0.5, 100, 1, 1.0)]
        self.assertEqual(pareto(rows), ["y"])


class RecommendTest(base.TestCase):
    def test_lowest_dcor_without_budgets_ties_to_fewer_bytes(self):
        rows = [ROWS[0], _row("far", 0.3, 900, 1, 0.1), ROWS[2]]
        self.assertEqual(recommend(rows).cut, "c")
        self.assertEqual(recommend(ROWS).cut, "c")  # c and e tie: the first

    def test_each_budget_is_obeyed(self):
        cases = [
            ({}, "c"),
            ({"max_dcor": 0.55}, "c"),
            ({"max_bytes_per_example": 250}, "a"),
            ({"max_bytes_per_example": 450}, "c"),
            ({"max_client_flops": 10_000}, "b"),
            ({"max_client_flops": 3_000}, "d"),
            ({"max_latency_ms": 0.3}, "d"),
            ({"max_latency_ms": 0.15}, "a"),
            ({"max_dcor": 0.7, "max_client_flops": 4_000}, "d"),
            ({"max_dcor": 0.55, "max_latency_ms": 1.0}, "b"),
        ]
        for budgets, expected in cases:
            chosen = recommend(ROWS, **budgets)
            self.assertEqual(chosen.cut, expected, budgets)
            row = next(r for r in ROWS if r.cut == chosen.cut)
            self.assertLessEqual(row.dcor, budgets.get("max_dcor") or 1e9)
            self.assertLessEqual(
                row.bytes_up, budgets.get("max_bytes_per_example") or 1e9
            )
            self.assertLessEqual(
                row.client_flops, budgets.get("max_client_flops") or 1e9
            )
            self.assertLessEqual(row.latency_ms, budgets.get("max_latency_ms") or 1e9)
            self.assertTrue(chosen.message.startswith(f"recommended cut: {expected} "))

    def test_no_cut_meets_names_the_budget_that_fails_everywhere(self):
        chosen = recommend(ROWS, max_dcor=0.2, max_bytes_per_example=1000)
        self.assertIsNone(chosen.cut)
        self.assertEqual(
            chosen.message,
            "no cut meets the budgets: --max_dcor=0.2 fails for every cut "
            "(best 0.3 at c)",
        )
        chosen = recommend(ROWS, max_bytes_per_example=20_000.0, max_client_flops=5e2)
        self.assertEqual(
            chosen.message,
            "no cut meets the budgets: --max_client_flops=500 fails for every "
            "cut (best 1000 at a)",
        )
        chosen = recommend(ROWS, max_dcor=0.2, max_latency_ms=0.05)
        self.assertEqual(
            chosen.message,
            "no cut meets the budgets: --max_dcor=0.2 fails for every cut "
            "(best 0.3 at c); --max_latency_ms=0.05 fails for every cut "
            "(best 0.1 at a)",
        )

    def test_no_cut_meets_all_budgets_at_once(self):
        chosen = recommend(ROWS, max_dcor=0.4, max_bytes_per_example=200)
        self.assertIsNone(chosen.cut)
        self.assertEqual(
            chosen.message,
            "no cut meets every budget at once (each is met by some cut): "
            "a fails max_dcor, b fails max_dcor+max_bytes_per_example, "
            "c fails max_bytes_per_example, d fails max_dcor+max_bytes_per_example, "
            "e fails max_bytes_per_example",
        )

    def test_unmeasured_latency_fails_a_latency_budget(self):
        rows = [_row("x", 0.5, 100, 1, float("nan"))]
        self.assertEqual(recommend(rows).cut, "x")
        self.assertEqual(
            recommend(rows, max_latency_ms=5).message,
            "no cut meets the budgets: --max_latency_ms=5 fails for every cut "
            "(not measured for any cut)",
        )


class AdviseTest(base.TestCase):
    def test_end_to_end_on_tiny_data_writes_table_json_and_png(self):
        root = self.tempdir()
        c = tiny_lenet(
            root,
            **{
                "train.epochs": 1,
                "train.batch_size": 32,
                "train.eval_batch_size": 64,
                "train.log_every_seconds": 0.0,
                "train.learning_rate": 1e-2,
                "privacy.leakage_examples": 32,
            },
        )
        workdir = os.path.join(root, "advise")
        rows, chosen = advisor.advise(
            c,
            workdir,
            cuts=["pool1", "fc1"],
            train_steps=3,
            aux_examples=64,
            eval_examples=32,
            decoder_epochs=1,
            latency_repeats=3,
            budgets={"max_bytes_per_example": 1000},
        )
        self.assertEqual([r.cut for r in rows], ["pool1", "fc1"])
        self.assertEqual(rows[0].bytes_up, 14 * 14 * 6 * 4)
        self.assertEqual(rows[1].bytes_up, 120 * 4)
        for r in rows:
            for value in (r.dcor, r.ssim, r.latency_ms, r.test_accuracy):
                self.assertTrue(np.isfinite(value), r)
            self.assertGreater(r.latency_ms, 0.0)
            self.assertTrue(
                os.path.exists(
                    os.path.join(workdir, f"cut_{r.cut}", "litert", "client.tflite")
                )
            )
        self.assertEqual(chosen.cut, "fc1")  # the only cut under 1000 bytes
        with open(os.path.join(workdir, "advisor.json")) as f:
            saved = json.load(f)
        self.assertEqual([r["cut"] for r in saved["rows"]], ["pool1", "fc1"])
        self.assertEqual(saved["recommended"], "fc1")
        self.assertEqual(saved["rows"][0]["client_params"], rows[0].client_params)
        with open(os.path.join(workdir, "advisor.md")) as f:
            text = f.read()
        self.assertIn("| pool1 | 156 | ", text)  # conv1: 5 * 5 * 6 + 6
        self.assertIn("| fc1 | ", text)
        self.assertIn("each cut trained 3 steps (batch 32", text)
        self.assertTrue(text.rstrip().endswith(chosen.message))
        with open(os.path.join(workdir, "advisor.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        # Each run's reconstruction grid and figures are in its TensorBoard.
        (events,) = glob.glob(os.path.join(workdir, "cut_pool1", "attacks", "events*"))
        tags = {
            value.tag: event.step
            for event in tf.compat.v1.train.summary_iterator(events)
            for value in event.summary.value
        }
        self.assertEqual(
            tags,
            {"reconstructions": 3, "reconstruction_ssim": 3, "reconstruction_mse": 3},
        )
