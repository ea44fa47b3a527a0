"""The coordinator's barrier (`Rounds`): a report that comes before the
round is trained waits; a retried report of an ended round is answered;
only the evaluating clients evaluate; a FedAvg client's local steps count
when it ends its round."""

import tensorflow as tf

from splitkeras.parties.averager import Averager
from splitkeras.protocol import Kind, Message, Rejected, Status
from splitkeras.schedules.coordinator import Rounds
from tests import base


class _Server:
    objective = None


def _message(kind, client, r, **fields):
    return Message(kind, client, 0, round=r, **fields)


class RoundsReportTest(base.TestCase):
    def test_an_early_report_waits_and_a_retried_one_is_answered(self):
        rounds = Rounds(_Server(), 2, epochs=2, reports=True)
        for k in (0, 1):
            reply = rounds.handle(_message(Kind.BEGIN, k, 0, count=4))
            self.assertEqual(reply.status, Status.READY)
        rounds.handle(_message(Kind.END, 0, 0, count=128))
        report = _message(Kind.REPORT, 0, 0, metrics={"test_accuracy": 0.5})
        # Client 0 evaluated while client 1 still trains: it must ask again.
        self.assertEqual(rounds.handle(report).status, Status.WAIT)
        self.assertEqual(rounds.position()[0], 0)
        rounds.handle(_message(Kind.END, 1, 0, count=128))
        self.assertEqual(rounds.position()[0], 0)  # the report is still due
        self.assertEqual(rounds.handle(report).status, Status.READY)
        self.assertEqual(rounds.position()[0], 1)
        self.assertEqual(rounds.logs[0][1], {"test_accuracy": 0.5})
        # Its reply was lost, the client sends it again: answered, no change.
        self.assertEqual(rounds.handle(report).status, Status.READY)
        self.assertEqual(rounds.position()[0], 1)
        with self.assertRaisesRegex(Rejected, "reports round 3, but the run is at"):
            rounds.handle(_message(Kind.REPORT, 0, 3))


class RoundsEvaluatorsTest(base.TestCase):
    def test_only_the_evaluating_client_evaluates(self):
        """Client 0 evaluates a round's model: another client's EVALUATE
        (which would change the figures client 0 reports) is refused; in a
        vertical split (evaluators=None) every feature holder sends its part."""
        rounds = Rounds(_Server(), 2, epochs=1, reports=True)
        vertical = Rounds(_Server(), 2, epochs=1, reports=True, evaluators=None)
        for coordinator in (rounds, vertical):
            for k in (0, 1):
                coordinator.handle(_message(Kind.BEGIN, k, 0, count=4))
                coordinator.handle(_message(Kind.END, k, 0, count=128))
        with self.assertRaises(Rejected) as refused:
            rounds.check(_message(Kind.EVALUATE, 1, 0))
        self.assertEqual(
            (refused.exception.reason, refused.exception.details),
            ("denied", "client 1 does not evaluate this run: client 0 does"),
        )
        rounds.check(_message(Kind.EVALUATE, 0, 0))
        for k in (0, 1):
            vertical.check(_message(Kind.EVALUATE, k, 0))


class RoundsStepsTest(base.TestCase):
    def test_a_fedavg_client_ending_its_round_adds_its_local_steps(self):
        """FedAvg's clients train locally: the host counts, as each ends
        its round, the batches it said at BEGIN times the local epochs (a
        retried END adds nothing)."""
        averager = Averager(2, [tf.Variable([0.0])], local_epochs=3)
        rounds = Rounds(averager, 2, epochs=1)
        rounds.handle(_message(Kind.BEGIN, 0, 0, count=4))
        rounds.handle(_message(Kind.BEGIN, 1, 0, count=5))
        rounds.handle(_message(Kind.END, 1, 0, count=80))
        self.assertEqual(int(rounds.step.numpy()), 15)
        rounds.handle(_message(Kind.END, 1, 0, count=80))  # a retry
        rounds.handle(_message(Kind.END, 0, 0, count=64))
        self.assertEqual(int(rounds.step.numpy()), 27)
