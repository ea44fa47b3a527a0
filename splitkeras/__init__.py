"""splitkeras: split learning (SplitNN) for TensorFlow 2 / Keras 3.

The public names load on first use (`splitkeras._lazy`): importing the
package does not import TensorFlow, so the TensorFlow-free edge client
(`splitkeras.edge`) runs on devices without it.
"""

from splitkeras._lazy import attach

__version__ = "0.1.0"

_EXPORTS = {
    "count_flops": "splitkeras.accounting",
    "Segments": "splitkeras.cut",
    "cut": "splitkeras.cut",
    "cut_points": "splitkeras.cut",
    "Client": "splitkeras.parties",
    "Relay": "splitkeras.parties",
    "Server": "splitkeras.parties",
    "Kind": "splitkeras.protocol",
    "Message": "splitkeras.protocol",
    "FedAvg": "splitkeras.schedules",
    "LargeBatchSGD": "splitkeras.schedules",
    "MultiHop": "splitkeras.schedules",
    "MultiTask": "splitkeras.schedules",
    "RoundRobin": "splitkeras.schedules",
    "SplitFed": "splitkeras.schedules",
    "VerticalSplit": "splitkeras.schedules",
    "SplitModel": "splitkeras.split_model",
    "get_codec": "splitkeras.transport.codec",
    "LocalTransport": "splitkeras.transport.local",
}

__all__ = sorted(_EXPORTS, key=lambda name: (name[0].islower(), name))

__getattr__, __dir__ = attach(__name__, _EXPORTS)
