"""PSI: blinding commutes, equal ids meet, the alignment is the set intersection."""

import os
import subprocess
import sys

import numpy as np
from absl.testing import parameterized

from splitkeras import psi
from tests import base

_P = 2**255 - 19


def _on_curve(row) -> bool:
    """Euler's criterion, independent of psi's Jacobi symbol: on Curve25519?"""
    u = int.from_bytes(row.tobytes(), "little")
    return u < _P and pow(u * (u * u + 486662 * u + 1), (_P - 1) // 2, _P) == 1


def _secret(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(32)


def _three_parties(kind: str, seed: int = 0):
    """Shuffled, partly overlapping ids of three parties, and their common ids."""
    rng = np.random.default_rng(seed)
    universe = rng.permutation(1000)[:120] - 500  # negative ids too
    held = {
        "labels": universe[:90],
        "bank": universe[30:110],
        "shop": np.concatenate([universe[20:70], universe[100:120]]),
    }
    held = {party: rng.permutation(ids) for party, ids in held.items()}
    common = set(universe[30:70].tolist())
    if kind == "str":
        held = {p: [f"user-{i}" for i in ids] for p, ids in held.items()}
        common = {f"user-{i}" for i in common}
    elif kind == "list":
        held = {p: ids.tolist() for p, ids in held.items()}
    return held, common


class HashIdsTest(base.TestCase):
    def test_rows_follow_ids_and_repeat(self):
        points = psi.hash_ids([3, 1, 2])
        self.assertEqual(points.shape, (3, 32))
        self.assertEqual(points.dtype, np.uint8)
        np.testing.assert_array_equal(points[1], psi.hash_ids([1])[0])
        np.testing.assert_array_equal(points, psi.hash_ids(np.array([3, 1, 2])))

    def test_int_dtypes_agree_and_types_never_collide(self):
        as_int32 = psi.hash_ids(np.array([7, -7], np.int32))
        np.testing.assert_array_equal(as_int32, psi.hash_ids([7, -7]))
        points = psi.hash_ids([7, "7", b"7", "", b""])
        self.assertLen({row.tobytes() for row in points}, 5)

    def test_every_point_is_on_the_curve_not_its_twist(self):
        # Blinding keeps a point on its side, and the side is public: a hash
        # on the twist would leak one bit of its id.
        points = psi.hash_ids(list(range(300)))
        self.assertTrue(all(_on_curve(row) for row in points))
        blinded = psi.Blinder(_secret(0)).blind(points)
        self.assertTrue(all(_on_curve(row) for row in blinded))

    @parameterized.named_parameters(
        ("float", [1.0, 2.0], TypeError, "float"),
        ("bool", [True], TypeError, "bool"),
        ("too_big", [2**63], ValueError, str(2**63)),
        ("two_d", np.zeros((2, 2), np.int64), ValueError, r"\(2, 2\)"),
        ("one_str", "abc", ValueError, "1-D sequence"),
    )
    def test_bad_ids_are_refused(self, ids, error, message):
        with self.assertRaisesRegex(error, message):
            psi.hash_ids(ids)


class BlinderTest(base.TestCase):
    @parameterized.parameters(1, 7, 64)
    def test_blinding_commutes(self, n):
        points = psi.hash_ids(np.arange(n))
        a, b = psi.Blinder(), psi.Blinder()
        np.testing.assert_array_equal(
            a.blind(b.blind(points)), b.blind(a.blind(points))
        )

    def test_deterministic_for_a_secret_and_different_across_secrets(self):
        points = psi.hash_ids(list(range(50)))
        a = psi.Blinder(_secret(1))
        once = a.blind(points)
        np.testing.assert_array_equal(once, a.blind(points))
        np.testing.assert_array_equal(once, psi.Blinder(a.secret).blind(points))
        other = psi.Blinder(_secret(2)).blind(points)
        self.assertFalse((once == other).all(axis=1).any())
        self.assertFalse((once == points).all(axis=1).any())

    def test_equal_ids_meet_and_different_ids_do_not(self):
        a, b = psi.Blinder(_secret(3)), psi.Blinder(_secret(4))
        ids_a, ids_b = list(range(10)), list(range(5, 15))
        full_a = b.blind(a.blind(psi.hash_ids(ids_a)))
        full_b = a.blind(b.blind(psi.hash_ids(ids_b)))
        matches = {
            (ids_a[i], ids_b[j])
            for i in range(10)
            for j in range(10)
            if (full_a[i] == full_b[j]).all()
        }
        self.assertEqual(matches, {(i, i) for i in range(5, 10)})

    def test_empty_list(self):
        self.assertEqual(psi.Blinder().blind(psi.hash_ids([])).shape, (0, 32))

    @parameterized.parameters(0, 31, 33)
    def test_secret_of_wrong_length(self, length):
        with self.assertRaisesRegex(ValueError, f"got {length};"):
            psi.Blinder(bytes(length))

    def test_secret_is_hidden_from_repr(self):
        blinder = psi.Blinder(_secret(5))
        self.assertNotIn(blinder.secret.hex(), repr(blinder))

    @parameterized.named_parameters(
        ("short_rows", np.zeros((3, 31), np.uint8), "uint8 array of shape"),
        ("int64", np.zeros((3, 32), np.int64), "int64 array of shape"),
        ("flat", np.zeros(32, np.uint8), r"shape \(32,\)"),
        ("list", [[0] * 32], "got a list"),
        ("low_order", np.zeros((2, 32), np.uint8), r"points\[0\] is a low-order"),
    )
    def test_bad_points_are_refused(self, points, message):
        with self.assertRaisesRegex(ValueError, message):
            psi.Blinder().blind(points)


class IntersectionRowsTest(base.TestCase):
    def test_aligns_on_the_leader_order(self):
        x, y, z, w = (np.full((1, 32), v, np.uint8) for v in (1, 2, 3, 4))
        rows = psi.intersection_rows(
            {"other": np.concatenate([z, w, x]), "lead": np.concatenate([x, y, z])},
            leader="lead",
        )
        np.testing.assert_array_equal(rows["lead"], [0, 2])
        np.testing.assert_array_equal(rows["other"], [2, 0])
        self.assertEqual(rows["other"].dtype, np.int64)

    def test_leader_missing(self):
        points = {"a": psi.hash_ids([1]), "b": psi.hash_ids([1])}
        with self.assertRaisesRegex(ValueError, "leader 'c' is not among"):
            psi.intersection_rows(points, leader="c")

    def test_bad_list_names_its_party(self):
        with self.assertRaisesRegex(ValueError, r"fully_blinded\['b'\]"):
            psi.intersection_rows({"a": psi.hash_ids([1]), "b": [1]}, leader="a")


class AlignInMemoryTest(base.TestCase):
    @parameterized.parameters("array", "list", "str")
    def test_rows_point_at_the_same_ids(self, kind):
        held, common = _three_parties(kind)
        rows = psi.align_in_memory(held, leader="labels")
        aligned = {p: [held[p][r] for r in rows[p]] for p in held}
        self.assertEqual(aligned["bank"], aligned["labels"])
        self.assertEqual(aligned["shop"], aligned["labels"])
        self.assertEqual(set(aligned["labels"]), common)
        self.assertLen(aligned["labels"], len(common))
        self.assertTrue((np.diff(rows["labels"]) > 0).all())

    def test_rows_do_not_depend_on_the_secrets(self):
        held, _ = _three_parties("array", seed=1)
        given = {p: _secret(10 + i) for i, p in enumerate(held)}
        first = psi.align_in_memory(held, "bank", secrets=given)
        second = psi.align_in_memory(held, "bank")  # fresh random secrets
        for party in held:
            np.testing.assert_array_equal(first[party], second[party])

    def test_duplicate_id_names_its_party(self):
        held = {"labels": [1, 2, 3], "bank": [3, 2, 9, 2]}
        with self.assertRaisesRegex(ValueError, "party 'bank' .* rows 1 and 3"):
            psi.align_in_memory(held, leader="labels")

    @parameterized.named_parameters(
        ("disjoint", {"a": [1, 2], "b": [3, 4]}),
        ("int_vs_str", {"a": [1, 2], "b": ["1", "2"]}),
        ("one_party_empty", {"a": [1, 2], "b": [1, 2], "c": []}),
    )
    def test_empty_intersection(self, held):
        with self.assertRaisesRegex(ValueError, "share no sample"):
            psi.align_in_memory(held, leader="a")

    def test_leader_missing(self):
        with self.assertRaisesRegex(ValueError, "leader 'x' is not among"):
            psi.align_in_memory({"a": [1], "b": [1]}, leader="x")

    def test_secrets_must_cover_the_parties(self):
        with self.assertRaisesRegex(ValueError, r"secrets are for \['a'\]"):
            psi.align_in_memory({"a": [1], "b": [1]}, "a", secrets={"a": bytes(32)})


class NoTensorFlowTest(base.TestCase):
    def test_module_imports_without_tensorflow(self):
        code = "import sys, splitkeras.psi; print('tensorflow' in sys.modules)"
        root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
        )
        self.assertEqual(result.stdout.strip(), "False")


class _Recording:
    """The aligner, recording every message it gets and every reply."""

    def __init__(self, aligner):
        self.aligner, self.states = aligner, []

    def handle(self, message):
        reply = self.aligner.handle(message)
        self.states += [message.state or b"", reply.state or b""]
        return reply

    def __getattr__(self, name):
        return getattr(self.aligner, name)


class AlignOverLinksTest(base.TestCase):
    def test_no_id_and_no_unblinded_point_travels(self):
        from splitkeras.schedules.alignment import Aligner, align
        from splitkeras.schedules.splitfed import interleave
        from splitkeras.transport.counters import ByteCounters
        from splitkeras.transport.local import LocalTransport
        from splitkeras.transport.turns import yield_all

        held = {
            0: [f"patient-{i}" for i in (3, 1, 4, 5, 9, 2, 6)],
            1: [f"patient-{i}" for i in (9, 7, 3, 2, 8, 5)],
        }
        recording = _Recording(Aligner(2, 0))
        counters = ByteCounters.for_categories(("alignment",), 2)
        link = LocalTransport(recording, 2, counters=counters)
        programs = [align(link, k, 2, ids) for k, ids in held.items()]
        rows = yield_all(interleave(programs))
        # The common samples, in party 0's order, at each party's rows.
        common = ["patient-3", "patient-5", "patient-9", "patient-2"]
        for k, ids in held.items():
            self.assertEqual([ids[r] for r in rows[k]], common)
        wire = b"".join(recording.states)
        self.assertGreater(len(wire), 0)
        for ids in held.values():
            for i, point in zip(ids, psi.hash_ids(ids)):
                self.assertFalse(i.encode() in wire, f"{i} sent")
                # Blinded before it is sent.
                self.assertFalse(point.tobytes() in wire, f"{i}'s point sent")
