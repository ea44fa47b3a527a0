"""A client segment exported to LiteRT, run with the `ai-edge-litert` interpreter.

`LiteSegment` wraps the signatures `splitkeras.export` writes (serve,
forward, backward, save, restore; see `splitkeras.export.module`). All
signature runners share one interpreter, so they share the segment's
variables: `forward` then `backward` trains it in place. numpy only.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["LiteSegment", "interpreter"]

TRAINING_SIGNATURES = ("forward", "backward", "save", "restore")


def interpreter(model, num_threads: int | None = None):
    """An `ai_edge_litert` Interpreter for a .tflite path or its bytes."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ModuleNotFoundError as e:
        raise ImportError(
            "running an exported segment needs the LiteRT interpreter: "
            "pip install 'splitkeras[edge]' (ai-edge-litert)"
        ) from e
    if isinstance(model, str | os.PathLike):
        return Interpreter(model_path=os.fspath(model), num_threads=num_threads)
    return Interpreter(model_content=bytes(model), num_threads=num_threads)


def _ordered(outputs: dict, prefix: str) -> list:
    names = sorted((k for k in outputs if k.startswith(prefix)), key=_index)
    # Runners return views of the interpreter's buffers: copy them out.
    return [np.array(outputs[k]) for k in names]


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


class LiteSegment:
    """An exported client segment: split inference and on-device training.

    `input_shape` and `cut_shapes` are the serve signature's (without the
    batch dimension); `trainable` says whether the training signatures are
    there.

    Args:
      model: the .tflite file (path) or its bytes.
      num_threads: interpreter threads (None: LiteRT's default).
    """

    def __init__(self, model, num_threads: int | None = None):
        self.interpreter = interpreter(model, num_threads)
        self.signatures = self.interpreter.get_signature_list()
        if "serve" not in self.signatures:
            raise ValueError(
                f"{model if isinstance(model, str) else 'the model'} has no "
                f"'serve' signature (it has {sorted(self.signatures)}): export it "
                "with splitkeras.export"
            )
        self._runners = {}
        if "init" in self.signatures:
            # LiteRT's resource variables start empty: load the exported values.
            self._runner("init")()
        serve = self._runner("serve")
        (x,) = serve.get_input_details().values()
        self.input_shape = [int(d) for d in x["shape_signature"][1:]]
        outputs = serve.get_output_details()
        # Each cut tensor's shape without the batch dimension, in cut order.
        self.cut_shapes = [
            [int(d) for d in outputs[name]["shape_signature"][1:]]
            for name in sorted(outputs, key=_index)
        ]
        self.trainable = all(k in self.signatures for k in TRAINING_SIGNATURES)
        self.num_state = (
            len(self.signatures["save"]["outputs"]) if self.trainable else 0
        )

    def _runner(self, key: str):
        if key not in self._runners:
            if key not in self.signatures:
                raise ValueError(
                    f"the exported segment has no {key!r} signature (an "
                    "inference-only export cannot train)"
                )
            self._runners[key] = self.interpreter.get_signature_runner(key)
        return self._runners[key]

    def serve(self, x: np.ndarray) -> list:
        """The cut tensors of `x` in inference mode."""
        return _ordered(self._runner("serve")(x=np.asarray(x, np.float32)), "cut_")

    def forward(self, x: np.ndarray) -> list:
        """The training-mode cut tensors of `x` (to send to the server)."""
        return _ordered(self._runner("forward")(x=np.asarray(x, np.float32)), "cut_")

    def backward(self, x: np.ndarray, grads) -> int:
        """Applies the update for the cut tensors' `grads`; returns the step."""
        feeds = {f"grad_{i}": np.asarray(g) for i, g in enumerate(grads)}
        out = self._runner("backward")(x=np.asarray(x, np.float32), **feeds)
        return int(np.asarray(out["step"]))

    def state(self) -> list:
        """Every variable of the segment and its optimizer, in export order."""
        return _ordered(self._runner("save")(), "state_")

    def load_state(self, arrays) -> None:
        """Loads a `state()` (or a Keras client's `pack_state`) into the segment.

        Raises:
          HandoffError: the arrays do not match the segment's variables in
            number, shape or dtype (LiteRT would resize silently).
        """
        from splitkeras.transport.sealing import HandoffError

        if not self.trainable:
            raise ValueError(
                "an inference-only export holds no state to load: use the "
                "client.tflite that has the training signatures"
            )
        arrays = list(arrays)
        if len(arrays) != self.num_state:
            raise HandoffError(
                f"handed-off state has {len(arrays)} arrays, the exported segment "
                f"has {self.num_state} variables: the clients' segments or "
                "optimizers differ"
            )
        runner = self._runner("restore")
        details = runner.get_input_details()
        feeds = {}
        for i, array in enumerate(arrays):
            name = f"state_{i:03d}"
            array = np.asarray(array)
            want = details[name]
            shape, dtype = tuple(want["shape"]), np.dtype(want["dtype"])
            if array.shape != shape or array.dtype != dtype:
                raise HandoffError(
                    f"handed-off variable {i} is {array.dtype}{list(array.shape)}, "
                    f"the exported segment has {dtype}{list(shape)}"
                )
            feeds[name] = array
        runner(**feeds)
