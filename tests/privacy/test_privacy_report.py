"""The privacy report's accuracy-dCor Pareto frontier over cuts and epochs."""

import json
import os

from splitkeras.configs import fashion_mnist_lenet
from splitkeras.studies.privacy_report import frontier, privacy_report
from tests import base
from tests.privacy.tiny import tiny_lenet


def _row(cut, alpha, *epochs):
    return {
        "cut": cut,
        "nopeek_alpha": alpha,
        "activation_noise": 0.0,
        "epochs": {
            str(n): {"test_accuracy": a, "leakage_dcor": d}
            for n, (a, d) in enumerate(epochs, 1)
        },
    }


def _dominates(p, q):
    no_worse = (
        p["test_accuracy"] >= q["test_accuracy"]
        and p["leakage_dcor"] <= q["leakage_dcor"]
    )
    return no_worse and (
        p["test_accuracy"] > q["test_accuracy"] or p["leakage_dcor"] < q["leakage_dcor"]
    )


class FrontierTest(base.TestCase):
    def test_points_no_other_beats_on_both_sorted_by_dcor(self):
        rows = [
            _row("pool1", 0.0, (0.80, 0.99), (0.88, 0.98)),
            _row("pool1", 0.5, (0.78, 0.70), (0.86, 0.50)),
            _row("fc1", 0.5, (0.70, 0.40), (0.85, 0.60), (0.86, 0.55)),
        ]
        front = frontier(rows)
        self.assertEqual(
            [(p["cut"], p["nopeek_alpha"], p["epoch"]) for p in front],
            [("fc1", 0.5, 1), ("pool1", 0.5, 2), ("pool1", 0.0, 2)],
        )
        # (fc1, epoch 3) ties pool1 alpha 0.5 epoch 2 on accuracy at a higher
        # dCor: beaten. Every point off the frontier is beaten by one on it.
        points = [
            {**f, "key": (r["cut"], r["nopeek_alpha"], int(e))}
            for r in rows
            for e, f in r["epochs"].items()
        ]
        on = {(p["cut"], p["nopeek_alpha"], p["epoch"]) for p in front}
        for q in points:
            if q["key"] not in on:
                self.assertTrue(any(_dominates(p, q) for p in front), q)


class ReportTest(base.TestCase):
    def test_two_cuts_give_rows_epochs_and_the_frontier_on_disk(self):
        root = self.tempdir()
        c = tiny_lenet(
            root,
            **{
                "train.epochs": 2,
                "train.batch_size": 64,
                "train.eval_batch_size": 64,
                "train.log_every_seconds": 0.0,
                "train.learning_rate": 1e-2,
                "privacy.leakage_examples": 32,
            },
        )
        workdir = os.path.join(root, "report")
        rows = privacy_report(
            c,
            workdir,
            alphas=[0.5],
            noises=[],
            cuts=["pool1", "fc1"],
            aux_examples=64,
            eval_examples=32,
            decoder_epochs=1,
            known_per_class=2,
        )
        self.assertEqual([r["cut"] for r in rows], ["pool1", "fc1"])
        for r in rows:
            self.assertEqual(sorted(r["epochs"]), ["1", "2"])
            # The last epoch's figures are the run's summary.
            last = r["epochs"]["2"]
            self.assertAlmostEqual(last["test_accuracy"], r["test_accuracy"], 6)
            self.assertAlmostEqual(last["leakage_dcor"], r["leakage_dcor"], 6)
            self.assertTrue(
                os.path.exists(
                    os.path.join(workdir, f"cut_{r['cut']}_alpha0.5_noise0", "train")
                )
            )
        with open(os.path.join(workdir, "report.json")) as f:
            saved = json.load(f)
        self.assertEqual(saved["pareto"], frontier(rows))
        self.assertEqual(saved["rows"], rows)
        with open(os.path.join(workdir, "report.md")) as f:
            text = f.read()
        self.assertIn("Model lenet5 cut at pool1, fc1, 2 epochs", text)
        self.assertIn("Pareto frontier: of the 4 (cut, setting, epoch) points", text)
        for p in saved["pareto"]:
            self.assertIn(
                f"| {p['cut']} | 0.5 | 0 | {p['epoch']} | {p['test_accuracy']:.4f} | ",
                text,
            )
        with open(os.path.join(workdir, "pareto.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_cuts_of_a_u_shaped_config_are_refused_before_any_run(self):
        c = fashion_mnist_lenet.get_config()
        c.topology = "ushaped"
        c.model.cut = "pool1,fc2"
        workdir = os.path.join(self.tempdir(), "report")
        with self.assertRaisesRegex(
            ValueError,
            "^cuts compares single cut points of vanilla splits; for "
            "config.topology='ushaped' set config.model.cut and leave cuts empty$",
        ):
            privacy_report(c, workdir, cuts=["pool1", "fc1"])
        self.assertFalse(os.path.exists(workdir))
