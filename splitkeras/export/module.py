"""A client segment as a `tf.Module` with the signatures a device needs.

Signatures (inputs and outputs are named; the batch dimension is dynamic):

- `serve(x) -> cut_0..cut_{n-1}`: split inference (inference mode).
- `forward(x) -> cut_0..`: the training-mode forward pass whose cut tensors
  the device sends to the server. It remembers the segment's non-trainable
  state (batch-norm statistics) as it was before the pass.
- `backward(x, grad_0..) -> step`: given the same `x` and the gradients of
  the cut tensors that came back, recomputes the forward pass from the
  remembered state (so batch-norm statistics move once per step, as in
  Keras), differentiates it with builtin-only rules
  (`splitkeras.export.gradients`) and applies the optimizer's update. The
  update equals `Client.backward`'s (regularization losses included).
- `save() -> state_000..`: every variable of the segment, then of its
  optimizer, in the order of `splitkeras.parties.handoff.pack_state`, so a
  device's state can be handed to a Keras client and back.
- `restore(state_000..) -> restored`: loads such a state.
- `init() -> initialized`: sets every variable to its value at export time.
  LiteRT does not load a SavedModel's variable values by itself (its
  resource variables start empty), so a runtime calls `init` once after
  loading (`splitkeras.edge.LiteSegment` does); the values are constants
  of this signature.

Cut tensors cross the cut in `wire_dtype` (float32 for the 16-bit compute
dtypes of mixed precision), as a Keras client sends them, and their
gradients come back in it. Every signature of a float32 segment converts
to LiteRT with builtin ops only (no Flex delegate), so a device runs it
with the `ai-edge-litert` interpreter and no TensorFlow.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from splitkeras.export.gradients import lite_gradients
from splitkeras.parties.segment_step import apply_gradients, wire_dtype

__all__ = ["SIGNATURES", "TrainableSegment", "state_name"]

SIGNATURES = ("serve", "forward", "backward", "save", "restore", "init")


def state_name(index: int) -> str:
    return f"state_{index:03d}"


def _cut_names(count):
    return [f"cut_{i}" for i in range(count)]


class TrainableSegment(tf.Module):
    """`segment` and `optimizer` with the device signatures (module docstring);
    `signatures(keys)` makes them.

    Args:
      segment: the client's Keras segment (one input; one or more outputs).
      optimizer: its optimizer (built here if it is not). Its state is part
        of `save`/`restore`; pass the trained client's optimizer to go on
        training where it stopped.
    """

    def __init__(self, segment, optimizer):
        super().__init__(name="splitkeras_client")
        if len(segment.inputs) != 1:
            raise ValueError(
                f"export needs a segment with one input, {segment.name!r} has "
                f"{len(segment.inputs)}"
            )
        self.segment = segment
        self.optimizer = optimizer
        if not optimizer.built:
            optimizer.build(segment.trainable_variables)
        self._state = list(segment.variables) + list(optimizer.variables)
        self._non_trainable = list(segment.non_trainable_variables)
        self._before = [
            tf.Variable(v.value, trainable=False, name="before")
            for v in self._non_trainable
        ]
        (inputs,) = segment.inputs
        self.input_spec = tf.TensorSpec([None, *inputs.shape[1:]], inputs.dtype, "x")
        self.cut_specs = [
            tf.TensorSpec([None, *t.shape[1:]], wire_dtype(t.dtype), name)
            for t, name in zip(segment.outputs, _cut_names(len(segment.outputs)))
        ]
        self.grad_specs = [
            tf.TensorSpec(spec.shape, spec.dtype, f"grad_{i}")
            for i, spec in enumerate(self.cut_specs)
        ]
        self.state_specs = [
            tf.TensorSpec(v.shape, v.dtype, state_name(i))
            for i, v in enumerate(self._state)
        ]

        # Each signature is a tf.function over this module's variables; the
        # others are made by `signatures` for the keys it is asked for (a
        # SavedModel traces every tf.function attribute it finds).
        self.infer = tf.function(self._serve, input_signature=[self.input_spec])
        self._inputs = {
            "forward": [self.input_spec],
            "backward": [self.input_spec, self.grad_specs],
            "save": [],
            "restore": [self.state_specs],
            "init": [],
        }

    def _named(self, outputs):
        return {
            spec.name: tf.cast(t, spec.dtype)
            for spec, t in zip(self.cut_specs, tf.nest.flatten(outputs))
        }

    def _serve(self, x):
        return self._named(self.segment(x, training=False))

    def _forward(self, x):
        for before, variable in zip(self._before, self._non_trainable):
            before.assign(variable.value)
        return self._named(self.segment(x, training=True))

    def _backward(self, x, grads):
        for before, variable in zip(self._before, self._non_trainable):
            variable.assign(before.value())
        gradients = lite_gradients(self.segment, x, grads)
        apply_gradients(self.optimizer, gradients, self.segment.trainable_variables)
        return {"step": tf.identity(self.optimizer.iterations)}

    def _save(self):
        return {state_name(i): tf.identity(v.value) for i, v in enumerate(self._state)}

    def _restore(self, values):
        for variable, value in zip(self._state, values):
            variable.assign(value)
        # A backward pass right after restores the statistics loaded here.
        for before, variable in zip(self._before, self._non_trainable):
            before.assign(variable.value)
        return {"restored": tf.constant(len(self._state), tf.int32)}

    def _init(self):
        variables = self._state + self._before
        for variable, value in zip(variables, self._init_values):
            variable.assign(tf.constant(value))
        return {"initialized": tf.constant(len(variables), tf.int32)}

    def signatures(self, keys=SIGNATURES) -> dict:
        """{signature key: concrete function} of `keys`, for `tf.saved_model.save`.

        `init` holds the variables' values of this moment.

        Raises:
          ValueError: an unknown key, or `backward` with a loss-scaled
            (mixed_float16) optimizer, whose scaling the device does not do.
        """
        unknown = sorted(set(keys) - set(SIGNATURES))
        if unknown:
            raise ValueError(f"unknown signatures {unknown}; there are {SIGNATURES}")
        if "backward" in keys and isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer
        ):
            raise ValueError(
                "on-device training does not scale its loss as a mixed_float16 "
                "Keras client does (LossScaleOptimizer): export this segment for "
                "inference (training=False)"
            )
        self._init_values = [v.numpy() for v in self._state + self._before]
        functions = {"serve": self.infer}
        for key in keys:
            if key != "serve":
                function = tf.function(
                    getattr(self, f"_{key}"), input_signature=self._inputs[key]
                )
                setattr(self, key, function)
                functions[key] = function
        return {key: functions[key].get_concrete_function() for key in keys}
