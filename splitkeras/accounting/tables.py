"""The seed's comparison tables for any config: client FLOPs and bandwidth.

`resource_tables(config, clients)` builds the config's model, cuts it at
`config.model.cut`, and prints, for each number of clients, what one client
spends in training FLOPs and in bytes with SplitNN, SplitFed, FedAvg and
large-batch SGD, plus the number of clients from which SplitNN sends less
than FedAvg. Nothing is trained: the figures are computed from the layers
(`flops.count_flops`) and the tensors that cross the cut
(`bandwidth.per_client_bytes`).
"""

from __future__ import annotations

from splitkeras import builders
from splitkeras import models as model_zoo
from splitkeras.accounting import bandwidth
from splitkeras.accounting.flops import count_flops
from splitkeras.cut import cut

__all__ = ["Assumptions", "assumptions", "client_flops", "resource_tables"]

METHODS = ("split", "splitfed", "fedavg", "large_batch_sgd")


class Assumptions:
    """What the tables assume: model, cut, data size, epochs, batch."""

    def __init__(self, model, at, num_examples, epochs, batch_size, input_shape):
        self.model = model
        self.at = at
        self.num_examples = num_examples
        self.epochs = epochs
        self.batch_size = batch_size
        self.input_shape = input_shape

    def describe(self) -> str:
        return (
            f"model {self.model.name} on {self.input_shape} inputs, cut at "
            f"{self.at!r}; {self.num_examples} training examples split equally "
            f"among the clients; {self.epochs} epochs (rounds); batch "
            f"{self.batch_size}; float32 tensors and weights; training FLOPs = "
            "forward + backward (1 multiply-add = 2 FLOPs)"
        )


def _shape(text: str):
    return tuple(int(d) for d in text.split(","))


def assumptions(config, arrays=None) -> Assumptions:
    """The table's assumptions from `config.accounting`, else the dataset."""
    acc = config.accounting
    shape = _shape(acc.input_shape) if acc.input_shape else arrays.input_shape
    classes = acc.num_classes or arrays.num_classes
    examples = acc.num_examples or len(arrays.x_train)
    model = model_zoo.build_model(
        config.model.name, input_shape=shape, num_classes=classes
    )
    return Assumptions(
        model,
        builders.cut_layers(config),
        examples,
        acc.epochs or config.train.epochs,
        acc.batch_size or config.train.batch_size,
        shape,
    )


def client_flops(a: Assumptions, method: str, num_clients: int) -> float:
    """One client's training FLOPs over all epochs with `method`."""
    per_client_examples = a.num_examples / num_clients * a.epochs
    # Nobody needs the gradient of the raw input: the segment the data enters
    # skips it (`input_gradient=False`); a U-shaped tail does send gradients.
    if method in ("split", "splitfed"):
        segments = cut(a.model, a.at)  # U-shaped: the client runs the tail too
        per_example = count_flops(segments.client, input_gradient=False).training
        if segments.tail is not None:
            per_example += count_flops(segments.tail).training
        return per_example * per_client_examples
    whole = count_flops(a.model, input_gradient=False).training
    return whole * per_client_examples


def resource_tables(a: Assumptions, clients) -> str:
    """Markdown: per-client TFLOPs and GB per method and number of clients."""
    head = "| method | " + " | ".join(f"{k} clients" for k in clients) + " |"
    rule = "|---|" + "---|" * len(clients)
    lines = [f"Assumptions: {a.describe()}.", "", "Client training TFLOPs:", ""]
    lines += [head, rule]
    for method in METHODS:
        cells = [f"{client_flops(a, method, k) / 1e12:.4g}" for k in clients]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Bytes per client (GB, sent + received):", "", head, rule]
    for method in METHODS:
        cells = []
        for k in clients:
            b = bandwidth.per_client_bytes(
                method, a.model, a.at, a.num_examples, k, a.epochs, a.batch_size
            )
            cells.append(f"{b.total / 1e9:.4g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    k = bandwidth.crossover(a.model, a.at, a.num_examples, a.epochs, a.batch_size)
    lines += [
        "",
        "Crossover: SplitNN sends less per client than FedAvg from "
        + (f"{k} clients on." if k else "no number of clients (never)."),
    ]
    return "\n".join(lines)
