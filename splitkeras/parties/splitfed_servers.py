"""SplitFed's main server as a host serves it (Thapa et al., AAAI 2022).

SFLV1 keeps one server-segment copy per client (`ServerCopies`); SFLV2 one
server segment that takes the clients' steps in a fixed order
(`OrderedServer`). The schedule around them is
`splitkeras.schedules.splitfed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from splitkeras.parties.averager import weighted_average
from splitkeras.parties.server import Server
from splitkeras.protocol import Kind, Message, NotYet

__all__ = ["OrderedServer", "ServerCopies"]


class ServerCopies:
    """SFLV1's main server: one `Server` per client, addressed by client id.

    The copies share one objective, so the round's training figures are
    those of every client's examples together.
    """

    per_client = True  # a host compiles each copy's step apart

    def __init__(self, copies: Sequence[Server]):
        self.copies = list(copies)

    @property
    def objective(self):
        return self.copies[0].objective

    def handle(self, message: Message) -> Message:
        """Client k's message goes to copy k."""
        return self.copies[message.client_id].handle(message)

    def average(self, round_index: int, examples: dict) -> None:
        """Every copy gets the copies' weights averaged, weighted by the
        examples each client trained on in round `round_index`."""
        del round_index
        counts = [examples.get(k, 0) for k in range(len(self.copies))]
        weights = [c.segment.weights for c in self.copies]
        average = weighted_average(weights, counts)
        for copy_weights in weights:
            for variable, value in zip(copy_weights, average):
                variable.assign(value)

    def __getattr__(self, name):
        # A host's questions (specs, labels, compiled kinds) are copy 0's.
        if name.startswith("_") or name == "copies":
            raise AttributeError(name)
        return getattr(self.copies[0], name)

    def pending(self, client_id: int) -> bool:
        return self.copies[client_id].pending(client_id)

    def compile_paused_steps(self, run_eagerly: bool = False) -> None:
        """Every copy's U-shaped steps (`Server.compile_paused_steps`)."""
        for copy in self.copies:
            copy.compile_paused_steps(run_eagerly)

    def rolled_back(self) -> None:
        for copy in self.copies:
            copy.rolled_back()


class OrderedServer:
    """SFLV2's main server: one `Server`, taking steps in a fixed order.

    Step s of client k comes after step s of every client before k and
    after step s-1 of every client; a client with fewer batches drops out
    when they run out (each client says its batch count at BEGIN). In one
    process the schedule runs the steps in that order; a host holds a step
    that comes early (`NotYet`) until its turn.
    """

    def __init__(self, server: Server, num_clients: int):
        self.server = server
        self.num_clients = num_clients
        self.batches = {}  # client -> batches this round (from BEGIN)
        self.done = {}  # client -> steps applied this round

    def start_round(self) -> None:
        self.batches, self.done = {}, {}

    def begun(self, client_id: int, batches: int) -> None:
        self.batches[client_id] = int(batches)

    def rolled_back(self) -> None:
        self.start_round()
        self.server.rolled_back()

    def handle(self, message: Message) -> Message:
        # Traced into a host's compiled step, the order is kept by the host,
        # which calls `admit` and `applied` around it.
        eager = not tf.inside_function()
        if eager:
            self.admit(message)
        reply = self.server.handle(message)
        if eager:
            self.applied(message, reply)
        return reply

    def admit(self, message: Message) -> None:
        """Raises `NotYet` if the step comes before its turn."""
        if message.kind in (Kind.TRAIN, Kind.OUTPUT_GRADIENTS) and self.batches:
            if len(self.batches) < self.num_clients:
                raise NotYet("every client must begin the round first")
            self._wait_for_turn(message.client_id, message.kind)

    def applied(self, message: Message, reply: Message) -> None:
        """Counts a finished step."""
        finished = message.kind == Kind.OUTPUT_GRADIENTS or (
            message.kind == Kind.TRAIN and reply.kind == Kind.GRADIENTS
        )
        if finished and self.batches:
            k = message.client_id
            self.done[k] = self.done.get(k, 0) + 1

    def _wait_for_turn(self, k, kind) -> None:
        if kind == Kind.OUTPUT_GRADIENTS:
            return  # completes the step its TRAIN began in turn
        step = self.done.get(k, 0)
        for j in range(self.num_clients):
            behind = step + (1 if j < k else 0)
            if self.done.get(j, 0) < min(behind, self.batches.get(j, 0)):
                raise NotYet(f"client {j}'s step {behind} comes before")

    def __getattr__(self, name):
        if name.startswith("_") or name == "server":
            raise AttributeError(name)
        return getattr(self.server, name)
