"""splitkeras: split learning (SplitNN) for TensorFlow 2 / Keras 3."""

from splitkeras.cut import Segments, cut, cut_points
from splitkeras.parties import Client, Server
from splitkeras.protocol import Kind, Message
from splitkeras.split_model import SplitModel
from splitkeras.transport.codec import get_codec
from splitkeras.transport.local import LocalTransport

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Kind",
    "LocalTransport",
    "Message",
    "Segments",
    "Server",
    "SplitModel",
    "cut",
    "cut_points",
    "get_codec",
]
