"""`edge.json`: what a device needs to join a run with an exported segment.

Written by `splitkeras.export.export_from_workdir` next to `client.tflite`;
read by the edge client. It names the data and its partition (so a device
in a simulation takes the same shard, in the same order, as a Keras client
would), the batch sizes, the codecs and the gRPC limits. json only.
"""

from __future__ import annotations

import dataclasses
import json

__all__ = ["EdgeSpec"]

FORMAT = 2  # 2: gRPC limits; data_path null when the run reads TFDS


@dataclasses.dataclass
class EdgeSpec:
    """The run an exported client segment belongs to.

    Attributes:
      input_shape: one example's shape (the batch dimension is dynamic);
        checked against the model's when the edge client loads it.
      cut_shapes: each cut tensor's shape without the batch dimension
        (checked likewise).
      max_message_mb / timeout_seconds / retry_seconds: `config.grpc`'s
        message size limit, deadline of every call, and how long to retry
        an unreachable server.
      codec_up / codec_down: codecs of activations / gradients.
      num_clients: clients of the run (round robin).
      client_id: the client the segment was exported from.
      seed: the run's seed (batch order, partition).
      batch_size / eval_batch_size: examples per training / evaluation step.
      data_name / data_path: the dataset; the path is the config's (None
        when the run reads TFDS's default directory). The edge client reads
        only an IDX folder or a .npz file.
      partition / dirichlet_alpha: how the training split is shared.
      ushaped: the run keeps labels and the tail on the clients (the edge
        client cannot train or predict it).
    """

    input_shape: list
    cut_shapes: list
    max_message_mb: int
    timeout_seconds: float
    retry_seconds: float
    codec_up: str = "float32"
    codec_down: str = "float32"
    num_clients: int = 1
    client_id: int = 0
    seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 1000
    data_name: str = ""
    data_path: str | None = None
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    ushaped: bool = False
    format: int = FORMAT

    @classmethod
    def from_config(cls, config, segments, client_id: int = 0) -> EdgeSpec:
        """The spec of `config`'s run; refuses what the edge client lacks.

        Raises:
          ValueError: the run uses client privacy defenses (NoPeek, noise on
            activations or gradients), which the exported segment does not
            apply: an edge client would silently send clear activations.
        """
        from splitkeras.privacy import defenses
        from splitkeras.transport.codec import codec_pair

        if defenses.from_config(config, client_id) is not None:
            raise ValueError(
                "config.privacy sets client defenses (NoPeek, activation or "
                "gradient noise); the exported segment does not apply them, so an "
                "edge client cannot take part in this run"
            )
        up, down = codec_pair(config)
        path = config.data.path
        return cls(
            input_shape=[int(d) for d in segments.client.inputs[0].shape[1:]],
            cut_shapes=[[int(d) for d in t.shape[1:]] for t in segments.client.outputs],
            max_message_mb=int(config.grpc.max_message_mb),
            timeout_seconds=float(config.grpc.timeout_seconds),
            retry_seconds=float(config.grpc.retry_seconds),
            codec_up=up,
            codec_down=down,
            num_clients=int(config.num_clients),
            client_id=client_id,
            seed=int(config.seed),
            batch_size=int(config.train.batch_size),
            eval_batch_size=int(config.train.eval_batch_size),
            data_name=str(config.data.name),
            data_path=str(path) if path else None,
            partition=str(config.data.partition),
            dirichlet_alpha=float(config.data.dirichlet_alpha),
            ushaped=segments.ushaped,
        )

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: str) -> EdgeSpec:
        with open(path) as f:
            fields = json.load(f)
        if fields.get("format") != FORMAT:
            raise ValueError(
                f"{path}: edge spec format {fields.get('format')!r}, this "
                f"splitkeras reads format {FORMAT}: export the segment again "
                "(`splitkeras export`)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})
