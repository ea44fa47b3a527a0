"""The edge client: an exported segment trained on a device without TensorFlow.

- `LiteSegment` (runtime.py): the LiteRT signature runners of `client.tflite`.
- `EdgeClient` (client.py): joins a splitkeras server over gRPC, trains its
  turns, evaluates, and serves split inference (`predict`).
- `EdgeSpec` (spec.py): edge.json, the run the segment belongs to.
- `connect` (connect.py): an `EdgeClient` from the files a device holds.
- `split_inference` (inference.py): a test split through PREDICT, its
  accuracy and latency.
- codecs.py: the wire codecs in numpy.

Install on the device with `pip install 'splitkeras[edge]'`; nothing here
imports TensorFlow (tested in a virtual environment without it).
"""

from splitkeras.edge.client import EdgeClient
from splitkeras.edge.runtime import LiteSegment
from splitkeras.edge.spec import EdgeSpec

__all__ = ["EdgeClient", "EdgeSpec", "LiteSegment"]
