"""splitkeras: split learning (SplitNN) for TensorFlow 2 / Keras 3."""

from splitkeras.accounting import count_flops
from splitkeras.cut import Segments, cut, cut_points
from splitkeras.parties import Client, Relay, Server
from splitkeras.protocol import Kind, Message
from splitkeras.schedules import (
    FedAvg,
    LargeBatchSGD,
    MultiHop,
    MultiTask,
    RoundRobin,
    SplitFed,
    VerticalSplit,
)
from splitkeras.split_model import SplitModel
from splitkeras.transport.codec import get_codec
from splitkeras.transport.local import LocalTransport

__version__ = "0.1.0"

__all__ = [
    "Client",
    "FedAvg",
    "Kind",
    "LargeBatchSGD",
    "LocalTransport",
    "Message",
    "MultiHop",
    "MultiTask",
    "Relay",
    "RoundRobin",
    "Segments",
    "Server",
    "SplitFed",
    "SplitModel",
    "VerticalSplit",
    "count_flops",
    "cut",
    "cut_points",
    "get_codec",
]
