"""`segment_step.compiled` calls steps through `Dispatched`: one concrete
function per input signature, the same results as the `tf.function`."""

import numpy as np
import tensorflow as tf

from splitkeras.parties.segment_step import Dispatched, compiled
from tests import base


class DispatchedTest(base.TestCase):
    def test_same_results_one_trace_per_signature(self):
        traces = []

        def step(step_id, tensors, labels, weights):
            traces.append(None)
            total = tf.reduce_sum(tensors[0]) * tf.cast(step_id, tf.float32)
            if labels is not None:
                total += tf.cast(tf.reduce_sum(labels), tf.float32)
            if weights is not None:
                total *= 2.0
            return total

        fn = compiled(step)
        self.assertIsInstance(fn, Dispatched)
        x = tf.ones((4, 3))
        y = tf.constant([1, 2, 3, 4])
        step_id = tf.constant(3, tf.int64)
        self.assertEqual(float(fn(step_id, [x], y, None)), 12.0 * 3 + 10)
        self.assertEqual(float(fn(step_id, [x * 2], y, None)), 24.0 * 3 + 10)
        self.assertLen(traces, 1)  # same signature: the one concrete function
        # None where a tensor was, another shape, a Python value: new keys.
        self.assertEqual(float(fn(step_id, [x], None, None)), 36.0)
        self.assertEqual(float(fn(step_id, [x], y, 1.0)), (36.0 + 10) * 2)
        self.assertEqual(float(fn(step_id, [tf.ones((2, 3))], y, None)), 18.0 + 10)
        self.assertEqual(float(fn(step_id, [np.ones((4, 3), np.float32)], y, None)), 46)
        # The array gets its key, and the tensor's concrete function.
        self.assertLen(fn._concrete, 5)
        self.assertLen({id(c) for c in fn._concrete.values()}, 4)
        self.assertLen(traces, 4)
        self.assertEqual(fn.experimental_get_tracing_count(), 4)

    def test_other_arguments_go_through_the_tf_function(self):
        class Box:
            def __init__(self, value):
                self.value = value

        fn = compiled(lambda box: tf.constant(box.value) * 2)
        self.assertEqual(int(fn(Box(3))), 6)
        self.assertEqual(fn._concrete, {})  # not keyed here: tf.function's way

    def test_variables_are_keyed_by_identity(self):
        a, b = tf.Variable(1.0), tf.Variable(5.0)
        fn = compiled(lambda v: v.assign_add(1.0))
        self.assertEqual(float(fn(a)), 2.0)
        self.assertEqual(float(fn(b)), 6.0)
        self.assertEqual((float(a.numpy()), float(b.numpy())), (2.0, 6.0))
        self.assertLen(fn._concrete, 2)

    def test_keywords_and_run_functions_eagerly_go_through_the_tf_function(self):
        fn = compiled(lambda x, scale=2.0: x * scale)
        self.assertEqual(float(fn(tf.constant(3.0), scale=3.0)), 9.0)
        self.assertEqual(fn._concrete, {})
        tf.config.run_functions_eagerly(True)
        try:
            self.assertEqual(float(fn(tf.constant(3.0))), 6.0)
        finally:
            tf.config.run_functions_eagerly(False)
        self.assertEqual(fn._concrete, {})

    def test_a_first_call_may_make_variables(self):
        made = []

        def step(x):
            if not made:
                made.append(tf.Variable(tf.zeros_like(x)))
            return made[0].assign_add(x)

        fn = compiled(step)
        self.assertEqual(fn(tf.ones(2)).numpy().tolist(), [1.0, 1.0])
        self.assertEqual(fn(tf.ones(2)).numpy().tolist(), [2.0, 2.0])
        self.assertLen(fn._concrete, 1)

    def test_run_eagerly_is_the_python_function(self):
        def step(x):
            return x + 1

        self.assertIs(compiled(step, run_eagerly=True), step)
