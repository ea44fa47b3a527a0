"""A U-shaped server step over a network: one compiled graph, paused between
its TRAIN and its OUTPUT_GRADIENTS message (`Server.compile_paused_steps`)."""

import threading

import keras
import numpy as np
import tensorflow as tf

from splitkeras.parties import Server
from splitkeras.parties.paused_step import inter_op_threads
from splitkeras.protocol import Kind, Message, NotYet
from tests import base


def _server(seed=0):
    """A U-shaped server: conv + batch norm + dense with an L2 penalty."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(5, kernel_regularizer="l2")(h)
    server = Server(keras.Model(inp, out), keras.optimizers.Adam(0.01))
    server.build_optimizer()
    return server


def _batch(seed=1, n=8):
    rng = np.random.default_rng(seed)
    cut = tf.constant(rng.normal(size=(n, 6, 6, 4)), tf.float32)
    seeds = tf.constant(rng.normal(size=(n, 5)), tf.float32)
    return cut, seeds


def _weights(server):
    return [v.numpy().copy() for v in server.segment.weights]


class PausedStepTest(base.TestCase):
    def test_equals_the_step_fused_into_one_graph(self):
        # In one process the server's half runs inside the client's compiled
        # step; over a network, as a paused graph. Same outputs, gradients
        # and weights, to the bit, over three steps.
        fused, paused = _server(), _server()
        paused.compile_paused_steps()

        def tail_gradients(outputs, target):
            # As a client's tail does: the gradients come from the outputs.
            # (Seeds that did not depend on them would let the fused graph
            # run the server's update before the forward pass that reads the
            # same weights: a race of the test's graph, not of a real step.)
            return outputs - target

        @tf.function
        def fused_step(cut, target):
            out = fused.handle(Message(Kind.TRAIN, 0, 1, (cut,)))
            seeds = tail_gradients(out.tensors[0], target)
            back = fused.handle(Message(Kind.OUTPUT_GRADIENTS, 0, 1, (seeds,)))
            return out.tensors, back.tensors

        for step in range(1, 4):
            cut, target = _batch(seed=step)
            want_out, want_grads = fused_step(cut, target)
            out = paused.handle(Message(Kind.TRAIN, 0, step, (cut,)))
            self.assertEqual(out.kind, Kind.SERVER_OUTPUT)
            seeds = tail_gradients(out.tensors[0], target)
            back = paused.handle(Message(Kind.OUTPUT_GRADIENTS, 0, step, (seeds,)))
            self.assertEqual(back.kind, Kind.GRADIENTS)
            np.testing.assert_array_equal(out.tensors[0], want_out[0], f"step {step}")
            np.testing.assert_array_equal(back.tensors[0], want_grads[0])
        self.assertWeightsClose(_weights(paused), _weights(fused), atol=0.0)
        self.assertFalse(paused.pending(0))

    def test_rollback_ends_the_step_without_its_update(self):
        server = _server()
        server.compile_paused_steps()
        before = _weights(server)
        cut, seeds = _batch()
        server.handle(Message(Kind.TRAIN, 0, 1, (cut,)))
        self.assertTrue(server.pending(0))
        step = server._open_steps[0]
        server.rolled_back()
        self.assertFalse(step._thread.is_alive())
        self.assertFalse(server.pending(0))
        # Batch norm's statistics moved in the forward pass (a host restores
        # its commit after a rollback); no trainable weight and no optimizer
        # variable (its step count included) moved.
        trainable = {id(v) for v in server.segment.trainable_variables}
        for variable, old in zip(server.segment.weights, before):
            if id(variable) in trainable:
                np.testing.assert_array_equal(variable.numpy(), old)
        self.assertEqual(int(server.optimizer.iterations.numpy()), 0)
        for variable in server.optimizer.variables:  # Adam's moments
            if "learning_rate" not in variable.path:
                np.testing.assert_array_equal(variable.numpy(), 0.0)
        with self.assertRaisesRegex(
            ValueError, "OUTPUT_GRADIENTS from client 0 for step 1 without a TRAIN"
        ):
            server.handle(Message(Kind.OUTPUT_GRADIENTS, 0, 1, (seeds,)))

    def test_a_step_begun_again_is_applied_once(self):
        # A client that trains its step again (after a restart) sends TRAIN
        # twice: the first step ends unapplied, the second applies.
        once, twice = _server(), _server()
        for server in (once, twice):
            server.compile_paused_steps()
        cut, seeds = _batch()
        first = twice.handle(Message(Kind.TRAIN, 0, 1, (cut,)))
        abandoned = twice._open_steps[0]
        twice.handle(Message(Kind.TRAIN, 0, 1, (cut,)))
        self.assertFalse(abandoned._thread.is_alive())
        twice.handle(Message(Kind.OUTPUT_GRADIENTS, 0, 1, (seeds,)))
        out = once.handle(Message(Kind.TRAIN, 0, 1, (cut,)))
        once.handle(Message(Kind.OUTPUT_GRADIENTS, 0, 1, (seeds,)))
        np.testing.assert_array_equal(first.tensors[0], out.tensors[0])
        trainable = [v.numpy() for v in twice.segment.trainable_variables]
        expected = [v.numpy() for v in once.segment.trainable_variables]
        self.assertWeightsClose(trainable, expected, atol=0.0)

    def test_an_error_before_the_pause_reaches_the_train_call(self):
        server = _server()
        server.compile_paused_steps()
        wrong = tf.zeros((2, 6, 6, 3))  # 3 channels, the segment takes 4
        with self.assertRaises((ValueError, tf.errors.InvalidArgumentError)):
            server.handle(Message(Kind.TRAIN, 0, 1, (wrong,)))
        self.assertFalse(server.pending(0))

    def test_open_steps_wait_for_a_free_thread_instead_of_hanging(self):
        # A paused graph holds an inter-op thread. Without a limit, as many
        # open steps as the pool has threads (SplitFed v1 U-shaped: one per
        # client) left none for the next step's forward pass, which hung.
        server = _server()
        server.compile_paused_steps()
        threads = inter_op_threads()
        slots = max(1, threads - 1)
        outcomes = []

        def start_more_than_the_pool_has():
            for k in range(threads + 1):
                try:
                    server.handle(Message(Kind.TRAIN, k, 1, (_batch(seed=k)[0],)))
                    outcomes.append("open")
                except NotYet:
                    outcomes.append("waits")

        starter = threading.Thread(target=start_more_than_the_pool_has, daemon=True)
        starter.start()
        starter.join(60)
        self.assertFalse(starter.is_alive(), "a step hung without a free thread")
        self.assertEqual(outcomes, ["open"] * slots + ["waits"] * (threads + 1 - slots))
        # An open step ends: the next one starts.
        server.handle(Message(Kind.OUTPUT_GRADIENTS, 0, 1, (_batch(seed=0)[1],)))
        server.handle(Message(Kind.TRAIN, slots, 1, (_batch(seed=slots)[0],)))
        self.assertTrue(server.pending(slots))
        server.rolled_back()

    def test_a_vanilla_server_keeps_its_one_message_step(self):
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        server = Server(
            keras.Model(inp, keras.layers.Dense(3)(inp)),
            keras.optimizers.SGD(0.1),
            objective=lambda y, p, w, training: tf.reduce_mean(p),
        )
        server.compile_paused_steps()
        self.assertIsNone(server._paused_fn)
