"""A multi-worker server's chief streams its steps, commits and rollbacks
to the other workers (`splitkeras.transport.mirror`): the items, the stream
over gRPC and who may follow, and a follower that applies them ending where
the chief ends."""

import concurrent.futures
import os
import time

import grpc
import keras
import numpy as np
import tensorflow as tf

from splitkeras.checkpointing import party_checkpoint
from splitkeras.cut import cut
from splitkeras.objective import Objective
from splitkeras.parties.server import Server
from splitkeras.protocol import Kind, Message
from splitkeras.schedules.turn_coordinator import Turns
from splitkeras.transport import mirror
from splitkeras.transport.proto import wire_pb2
from tests import base
from tests.distributed.test_service import FixtureCase, _model

SECRET = "s" * 32


class ItemTest(base.TestCase):
    def test_a_message_comes_back_as_sent(self):
        rng = np.random.default_rng(0)
        message = Message(
            Kind.TRAIN,
            1,
            7,
            (rng.normal(size=(4, 3)).astype(np.float32), np.arange(4, dtype=np.int32)),
            np.array([0, 1, 2, 1], np.int64),
            np.array([1.0, 0.5, 0.0, 2.0], np.float32),
            offset=2,
            rows=6,
        )
        what, party, back, numbers = mirror.unpack(
            mirror.pack(mirror.CALL, "server", message)
        )
        self.assertEqual((what, party, numbers), (mirror.CALL, "server", {}))
        self.assertEqual(
            (back.kind, back.client_id, back.step, back.offset, back.rows),
            (Kind.TRAIN, 1, 7, 2, 6),
        )
        self.assertIsNone(back.ids)
        for got, sent in zip(
            (*back.tensors, back.labels, back.sample_weight),
            (*message.tensors, message.labels, message.sample_weight),
        ):
            self.assertEqual(got.dtype, sent.dtype)
            np.testing.assert_array_equal(got, sent)
        self.assertEqual(
            mirror.unpack(mirror.pack(mirror.HELLO, commits=3)),
            (mirror.HELLO, "", None, {"commits": 3}),
        )


class StreamTest(base.TestCase):
    def _serve(self, chief):
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers(
            (chief.handler(mirror.pack(mirror.HELLO, commits=1)),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(lambda: server.stop(grace=None).wait())
        return f"127.0.0.1:{port}"

    def _first_code(self, target, worker, secret=SECRET):
        try:
            next(mirror.follow_stream(target, worker, secret))
        except grpc.RpcError as e:
            return e.code(), e.details()
        return None

    def test_items_come_in_order_until_done(self):
        chief = mirror.Mirror.for_cluster(
            {"worker": ["localhost:1", "127.0.0.1:2", "127.0.0.1:3"]}, SECRET
        )
        self.assertEqual(len(chief), 2)
        target = self._serve(chief)
        with self.assertRaisesRegex(TimeoutError, r"server workers \[1, 2\] did not"):
            chief.wait_for_followers(0.1)
        for i in range(3):
            chief.publish(mirror.pack(mirror.COMMIT, step=i))
        chief.publish(mirror.DONE_ITEM)
        self.assertEqual(
            self._first_code(target, 1, "x" * 32),
            (
                grpc.StatusCode.UNAUTHENTICATED,
                "wrong or missing server secret: a follower needs the chief's "
                "$SPLITKERAS_SERVER_SECRET",
            ),
        )
        got = [mirror.unpack(i) for i in mirror.follow_stream(target, 2, SECRET)]
        self.assertEqual(
            [(what, numbers) for what, _, _, numbers in got],
            [
                (mirror.HELLO, {"commits": 1}),
                *[(mirror.COMMIT, {"step": i}) for i in range(3)],
                (mirror.DONE, {}),
            ],
        )
        self.assertEqual(
            self._first_code(target, 2),
            (
                grpc.StatusCode.ALREADY_EXISTS,
                "worker 2 already follows (a restarted worker needs every "
                "server process restarted)",
            ),
        )
        self.assertEqual(
            self._first_code(target, 3),
            (
                grpc.StatusCode.INVALID_ARGUMENT,
                "worker 3 is not a follower of this chief (followers: [1, 2])",
            ),
        )

    def test_only_the_clusters_addresses_follow(self):
        chief = mirror.Mirror.for_cluster(
            {"worker": ["10.9.9.9:1", "10.9.9.8:1"]}, SECRET
        )
        target = self._serve(chief)
        self.assertEqual(
            self._first_code(target, 1),
            (
                grpc.StatusCode.PERMISSION_DENIED,
                "127.0.0.1 is not a worker of this server's cluster",
            ),
        )


def _twin(directory):
    """A follower of the service fixture's host: the same server, built the
    same way."""
    server = Server(
        cut(_model(), "conv").server,
        keras.optimizers.SGD(0.1),
        Objective(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            ("accuracy",),
        ),
    )
    server.build_optimizer()
    turns = Turns(server, 2, epochs=1, store_state=True, clock=time.monotonic)
    state = {
        "server": party_checkpoint([server.segment], server.optimizer),
        "coordinator": tf.train.Checkpoint(**turns.trackables()),
    }
    return server, mirror.Follower({"server": turns}, state, directory)


class FollowerTest(FixtureCase):
    def test_follower_ends_where_the_chief_ends(self):
        """Two steps, a rollback (the turn begun again), one step and the
        turn's end on the chief; the follower, given what the chief
        streamed, holds the same weights, optimizer steps and commits."""
        f = self.f
        chief = mirror.Mirror([1], ["127.0.0.1"], SECRET)
        f.host.mirror_to(chief)
        server, follower = _twin(os.path.join(self.tempdir(), "follower"))
        f.begin()
        for step in (1, 2):
            f.c0.call("Exchange", f.envelope(step), wire_pb2.Envelope)
        f.begin()  # again: the host rolls back to the turn's start
        f.c0.call("Exchange", f.envelope(1), wire_pb2.Envelope)
        f.c0.call("Exchange", f.control(Kind.END, step=1), wire_pb2.Envelope)
        items = []
        while not chief._queues[1].empty():
            items.append(chief._queues[1].get())
        self.assertEqual(
            [mirror.unpack(item)[0] for item in items],
            [mirror.CALL, mirror.CALL, mirror.ROLLBACK, mirror.CALL, mirror.COMMIT],
        )
        self.assertFalse(any(follower.apply(item) for item in items))
        self.assertEqual(
            follower.counts,
            {"steps": 3, "failed_steps": 0, "commits": 1, "rollbacks": 1},
        )
        self.assertWeightsClose(
            server.segment.get_weights(), f.segments.server.get_weights(), atol=0.0
        )
        self.assertEqual(
            int(server.optimizer.iterations.numpy()),
            int(f.server.optimizer.iterations.numpy()),
        )
        self.assertEqual(int(follower.commits.numpy()), f.host.commits)
        # The chief restarted at the commit before the follower's last one
        # (it stopped before saving what it told): the follower goes back to
        # it. A commit it does not keep is refused.
        follower.apply(mirror.pack(mirror.HELLO, commits=1))
        self.assertEqual(int(follower.commits.numpy()), 1)
        with self.assertRaisesRegex(RuntimeError, "is at commit 1, the chief at 9"):
            follower.apply(mirror.pack(mirror.HELLO, commits=9))
        # A chief that stops early stops its followers.
        with self.assertRaisesRegex(RuntimeError, "the chief stopped before"):
            follower.apply(mirror.ABORT_ITEM)
