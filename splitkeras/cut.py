"""Cut a Keras model into party segments at named layers.

A cut at layer ``L`` gives the client every operation that ``L`` depends on
(``L`` included) and the server everything else. Every tensor that crosses
from the client's part to the server's part is carried as a segment input: a
skip connection that jumps over the cut becomes a second cut tensor.

A cut at two layers ``(L1, L2)`` gives the U-shaped configuration: the client
head (up to ``L1``), the server (up to ``L2``) and the client tail (the rest,
where the labels and the loss stay).

The segments are Keras models built on the original graph: they share the
original layer objects, so training the segments trains the original model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras

__all__ = ["Segments", "cut", "cut_points"]


@dataclasses.dataclass(frozen=True)
class Segments:
    """The party segments of a cut model.

    Attributes:
      client: the client's segment (raw input -> cut tensors). In the U-shaped
        configuration this is the client head.
      server: the server's segment (cut tensors -> logits, or -> the tensors
        that go back to the client tail).
      tail: the client tail of the U-shaped configuration, else ``None``.
      cut_layers: the layer names the model was cut at.
    """

    client: keras.Model
    server: keras.Model
    tail: keras.Model | None
    cut_layers: tuple[str, ...]

    @property
    def ushaped(self) -> bool:
        return self.tail is not None

    def __iter__(self):
        parts = (self.client, self.server, self.tail)
        return iter(p for p in parts if p is not None)


class _BadCut(ValueError):
    """An invalid cut; `cut` adds the list of valid cut points."""


class _Graph:
    """The nodes of a functional model, in topological order."""

    def __init__(self, model: keras.Model):
        if not model.built or not getattr(model, "inputs", None):
            raise ValueError(
                f"model '{model.name}' has no symbolic inputs: build it as a "
                "functional or Sequential model with a keras.Input (or call "
                "model.build(input_shape) on a Sequential) before cutting it."
            )
        self.model = model
        self.inputs = list(model.inputs)
        self.outputs = list(model.outputs)
        self.input_ids = {id(t) for t in self.inputs}
        self.nodes = self._topological_nodes()
        self.position = {id(n): i for i, n in enumerate(self.nodes)}

    @staticmethod
    def producer(tensor):
        op, node_index, _ = tensor._keras_history
        return None if op is None else op._inbound_nodes[node_index]

    def parents(self, node):
        found = []
        for t in node.input_tensors:
            if id(t) in self.input_ids:
                continue
            parent = self.producer(t)
            if parent is not None and not parent.is_input:
                found.append(parent)
        return found

    def _topological_nodes(self):
        order, state = [], {}
        stack = [(self.producer(t), False) for t in reversed(self.outputs)]
        while stack:
            node, expanded = stack.pop()
            if node is None or node.is_input:
                continue
            if expanded:
                if state.get(id(node)) != "done":
                    state[id(node)] = "done"
                    order.append(node)
                continue
            if id(node) in state:
                continue
            state[id(node)] = "open"
            stack.append((node, True))
            stack.extend((p, False) for p in reversed(self.parents(node)))
        return order

    def node_of(self, name: str):
        matches = [n for n in self.nodes if n.operation.name == name]
        if not matches:
            raise ValueError(
                f"cut layer '{name}' not found in model '{self.model.name}'; "
                f"valid cut points are: {', '.join(cut_points(self.model)) or '(none)'}"
            )
        if len(matches) > 1:
            raise _BadCut(
                f"cut layer '{name}' is called {len(matches)} times in model "
                f"'{self.model.name}' (a shared layer): its weights would be "
                "used on both sides of the cut."
            )
        return matches[0]

    def ancestors(self, node) -> set[int]:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.extend(self.parents(n))
        return seen


def _crossing(graph: _Graph, members: set[int]) -> list:
    """Tensors consumed by `members` but produced outside them, in order."""
    found, seen = [], set()
    for node in graph.nodes:
        if id(node) not in members:
            continue
        for t in node.input_tensors:
            producer = graph.producer(t)
            inside = producer is not None and id(producer) in members
            if not inside and id(t) not in seen:
                seen.add(id(t))
                found.append(t)
    return found


def _position(graph: _Graph, tensor) -> int:
    producer = graph.producer(tensor)
    if id(tensor) in graph.input_ids or producer is None:
        return -1
    return graph.position.get(id(producer), -1)


def _plan(graph: _Graph, names: Sequence[str]) -> list[set[int]]:
    """Splits the graph's nodes into one set per party, or raises ValueError."""
    cut_nodes = [graph.node_of(n) for n in names]
    parts, claimed = [], set()
    for node in cut_nodes:
        part = graph.ancestors(node) - claimed
        if id(node) in claimed or not part:
            raise _BadCut(
                f"cut layers {list(names)} are not in graph order in model "
                f"'{graph.model.name}': '{node.operation.name}' is already on "
                "an earlier side of the cut. List cut layers from input to "
                "output."
            )
        parts.append(part)
        claimed |= part
    rest = {id(n) for n in graph.nodes} - claimed
    if not rest:
        raise _BadCut(
            f"cut layer '{names[-1]}' leaves nothing for the next party in "
            f"model '{graph.model.name}' (it produces the model's output)."
        )
    parts.append(rest)
    _check_plan(graph, names, parts)
    return parts


def _check_plan(graph, names, parts):
    model_name = graph.model.name
    for i, part in enumerate(parts[1:], start=1):
        for t in _crossing(graph, part):
            source = _party_of(graph, parts, t)
            if source != i - 1:
                where = "a model input" if source < 0 else "an earlier segment"
                raise _BadCut(
                    f"cut at {list(names)} does not separate model "
                    f"'{model_name}': a tensor from {where} bypasses the cut "
                    f"layer '{names[i - 1]}' and feeds segment {i} directly."
                )
    for t in graph.outputs:
        if _party_of(graph, parts, t) != len(parts) - 1:
            raise _BadCut(
                f"cut at {list(names)} leaves an output of model "
                f"'{model_name}' before the last cut; cut after every branch "
                "that produces an output."
            )
    owner = {}
    for i, part in enumerate(parts):
        for node in graph.nodes:
            if id(node) in part and owner.setdefault(id(node.operation), i) != i:
                raise _BadCut(
                    f"layer '{node.operation.name}' of model '{model_name}' "
                    f"is shared across the cut at {list(names)}: its weights "
                    "would be on both sides."
                )


def _party_of(graph, parts, tensor) -> int:
    producer = graph.producer(tensor)
    if id(tensor) in graph.input_ids or producer is None or producer.is_input:
        return -1
    for i, part in enumerate(parts):
        if id(producer) in part:
            return i
    return -1


def _unwrap(tensors: list):
    return tensors[0] if len(tensors) == 1 else tensors


def cut(model: keras.Model, at: str | Sequence[str]) -> Segments:
    """Cuts `model` into party segments at the named layer(s).

    Args:
      model: a built Keras 3 functional or Sequential model (including
        `keras.applications` models).
      at: one layer name (client | server) or two (client head | server |
        client tail, the U-shaped configuration). The named layer is the last
        layer of the party before the cut.

    Returns:
      The `Segments`. A segment with one input (or output) tensor takes (or
      returns) it directly; with several, a list ordered as in the graph.

    Raises:
      ValueError: unknown layer, a cut that does not separate the graph, a
        layer whose weights would be on both sides, or cut layers out of
        order. The message lists the valid cut points.
    """
    names = (at,) if isinstance(at, str) else tuple(at)
    if len(names) not in (1, 2):
        raise ValueError(
            f"cut takes one layer name (vanilla) or two (U-shaped); got {names}"
        )
    graph = _Graph(model)
    try:
        parts = _plan(graph, names)
    except _BadCut as e:
        valid = ", ".join(cut_points(model)) or "(none)"
        raise ValueError(f"{e} Valid cut points: {valid}") from None
    roles = ["client", "server"] if len(names) == 1 else ["client", "server", "tail"]
    segments = []
    inputs = graph.inputs
    for i in range(len(parts)):
        if i + 1 < len(parts):
            outputs = sorted(
                _crossing(graph, parts[i + 1]), key=lambda t: _position(graph, t)
            )
        else:
            outputs = graph.outputs
        segments.append(
            keras.Model(
                _unwrap(list(inputs)),
                _unwrap(list(outputs)),
                name=f"{model.name}_{roles[i]}",
            )
        )
        inputs = outputs
    tail = segments[2] if len(segments) == 3 else None
    return Segments(segments[0], segments[1], tail, names)


def cut_points(model: keras.Model) -> list[str]:
    """Lists the layer names `model` can be cut at (vanilla, one cut).

    Args:
      model: a built Keras functional or Sequential model.

    Returns:
      Layer names in graph order; cutting at any of them gives a valid client
      | server split.
    """
    graph = _Graph(model)
    counts = {}
    for node in graph.nodes:
        counts[node.operation.name] = counts.get(node.operation.name, 0) + 1
    valid = []
    for node in graph.nodes:
        name = node.operation.name
        if counts[name] != 1 or not isinstance(node.operation, keras.layers.Layer):
            continue
        try:
            _plan(graph, [name])
        except _BadCut:
            continue
        valid.append(name)
    return valid
