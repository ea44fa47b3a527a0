"""The client side of the round robin over gRPC, whatever runs the segment.

`TurnClient` joins the server, waits for this client's turn of each epoch,
loads the state the previous client handed on (sealed with the clients'
AES key), trains the turn, hands its own state on, and begins a turn again
when the server has rolled it back. The Keras client
(`splitkeras.distributed.RemoteClient`) and the LiteRT edge client
(`splitkeras.edge.EdgeClient`) differ only in the hooks: how a turn is
trained and how state is packed. No TensorFlow here.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitkeras.transport.grpc_client import Connection, TurnRestarted
from splitkeras.transport.proto import wire_pb2
from splitkeras.transport.sealing import seal, unseal

log = logging.getLogger("splitkeras")

__all__ = ["TurnClient"]


class TurnClient:
    """Round-robin turns over a `Connection`; subclasses train and pack.

    Args:
      connection: this client's `Connection` to the server.
      client_id: this client's id, 0..K-1.
      key: the clients' shared AES-256 handoff key (None: no turns, e.g.
        split inference only).
      codecs: (activations, gradients) codec names this client uses; Join
        refuses a server with others.

    Subclasses implement `_train_turn(epoch, evaluate) -> metrics`,
    `_packed_state() -> bytes`, `_load_state(plain or None for the initial
    state)`, `steps` (a property: training steps so far, settable) and may
    override `_restart_cause` and `_turn_restarted`.
    """

    restart_errors = (TurnRestarted,)  # what a turn's failure may arrive as

    def __init__(self, connection: Connection, client_id: int, key, codecs):
        self.connection = connection
        self.client_id = client_id
        self._aead = AESGCM(key) if key is not None else None
        self.restarts = 0
        self.info = info = connection.call(
            "Join", wire_pb2.JoinRequest(client_id=client_id), wire_pb2.JoinReply
        )
        if (info.codec_up, info.codec_down) != tuple(codecs):
            raise ValueError(
                f"the server uses codecs {info.codec_up}/{info.codec_down}, this "
                f"client {codecs[0]}/{codecs[1]}"
            )

    # ------------------------------------------------------------- hooks
    def _train_turn(self, epoch: int, evaluate: bool) -> dict:
        raise NotImplementedError

    def _packed_state(self) -> bytes:
        raise NotImplementedError

    def _load_state(self, plain: bytes | None) -> None:
        raise NotImplementedError

    def _restart_cause(self, error):
        """The error behind a failed turn (a `TurnRestarted` to restart)."""
        return error

    def _turn_restarted(self) -> None:
        """Called before a rolled-back turn is trained again."""

    # ------------------------------------------------------------- turns
    def _check_key(self) -> None:
        if self._aead is None:
            raise ValueError(
                f"client {self.client_id} was made without the clients' handoff "
                "key (key=None: split inference only); taking turns needs it to "
                "open and seal the handed-on state"
            )

    def begin_turn(self, epoch: int):
        """Waits for this client's turn of `epoch` and loads the handed-on state.

        Returns the TurnReply (ready=False: the turn has passed), or None
        when the run is over.

        Raises:
          ValueError: this client has no handoff key.
        """
        self._check_key()
        while True:
            turn = self.connection.call(
                "BeginTurn",
                wire_pb2.TurnRequest(client_id=self.client_id, epoch=epoch),
                wire_pb2.TurnReply,
            )
            if turn.done:
                return None
            if turn.ready or (turn.epoch, turn.turn) > (epoch, self.client_id):
                break
        if turn.ready:
            plain = None
            if turn.state:
                _, plain = unseal(self._aead, turn.state, f"client {self.client_id}")
            self._load_state(plain)
            self.steps = int(turn.step)
        return turn

    def end_turn(self, epoch: int, metrics: dict | None = None) -> None:
        """Hands this client's sealed state on through the server."""
        self._check_key()
        state = seal(
            self._aead,
            f"epoch {epoch} from client {self.client_id}",
            self._packed_state(),
        )
        self.connection.call(
            "EndTurn",
            wire_pb2.TurnEnd(
                client_id=self.client_id,
                epoch=epoch,
                step=self.steps,
                state=state,
                metrics=metrics or {},
            ),
            wire_pb2.TurnEndReply,
        )

    def run_turns(self) -> None:
        """Trains this client's turn of every epoch (the last client of each
        round also evaluates); a rolled-back turn is trained again."""
        self._check_key()  # before any turn is waited for or trained
        last_client = self.info.num_clients - 1
        epoch = int(self.info.epoch)
        while epoch < self.info.epochs:
            turn = self.begin_turn(epoch)
            if turn is None:  # the run is over
                break
            if not turn.ready:  # our turn of this epoch has passed (skipped)
                epoch += 1
                continue
            try:
                evaluate = self.client_id == last_client
                self.end_turn(epoch, self._train_turn(epoch, evaluate))
            except self.restart_errors as e:
                cause = self._restart_cause(e)
                if not isinstance(cause, TurnRestarted):
                    raise cause from None
                self._turn_restarted()
                self.restarts += 1
                log.warning(
                    "client %d: turn of epoch %d restarts: %s",
                    self.client_id,
                    epoch,
                    cause,
                )
                continue
            epoch += 1

    def connection_summary(self) -> dict:
        """This client's id, steps, bytes sent and received, retries, restarts."""
        return {
            "client_id": self.client_id,
            "steps": self.steps,
            "bytes_sent": self.connection.bytes_sent,
            "bytes_received": self.connection.bytes_received,
            "retries": self.connection.retries,
            "restarted_turns": self.restarts,
        }
