"""Datasets read as streams (per epoch, from TFDS files), not numpy arrays.

`imagenet2012` (1.28 M training images) does not fit in memory. A
`StreamingSource` stands where `DatasetArrays` stands for small datasets:
it has a name, an input shape and a class count, and it makes each client's
training stream of an epoch (its disjoint shard of the split, preprocessed
by `splitkeras.data.imagenet`) and the evaluation stream.
"""

from __future__ import annotations

import dataclasses

__all__ = ["STREAMING", "StreamingSource", "open_source"]

STREAMING = ("imagenet2012",)


@dataclasses.dataclass
class StreamingSource:
    """A TFDS image classification dataset read per epoch.

    Attributes:
      name: the TFDS name.
      data_dir: the TFDS data_dir holding the prepared dataset.
      image_size: side of the square crops the model sees.
      num_classes: classes of the labels.
      splits: {split name: examples}.
      cache: cache the encoded examples in memory after the first epoch.
    """

    name: str
    data_dir: str | None
    image_size: int
    num_classes: int
    splits: dict
    cache: bool = False
    eval_split: str = "validation"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train(self, batch_size, seed, epoch, shard_index=0, num_shards=1):
        """Client `shard_index`'s stream of one epoch (full batches)."""
        from splitkeras.data import imagenet

        return imagenet.train_dataset(
            batch_size,
            data_dir=self.data_dir,
            name=self.name,
            image_size=self.image_size,
            num_shards=num_shards,
            shard_index=shard_index,
            seed=seed,
            epoch=epoch,
            cache=self.cache,
        )

    def eval(self, batch_size):
        """The evaluation split, center crops, the last batch partial."""
        from splitkeras.data import imagenet

        return imagenet.eval_dataset(
            batch_size,
            data_dir=self.data_dir,
            name=self.name,
            split=self.eval_split,
            image_size=self.image_size,
            cache=self.cache,
        )


def open_source(config) -> StreamingSource:
    """The `StreamingSource` of `config.data` (name in `STREAMING`)."""
    from splitkeras.data import imagenet

    data = config.data
    if data.name not in STREAMING:
        raise ValueError(f"{data.name!r} is not a streaming dataset ({STREAMING})")
    if data.get("partition", "iid") != "iid":
        raise ValueError(
            f"{data.name} is sharded evenly among clients (partition 'iid'); "
            f"got config.data.partition={data.partition!r}"
        )
    data_dir = str(data.path) if data.path else None
    num_classes, splits = imagenet.info(data.name, data_dir)
    return StreamingSource(
        name=data.name,
        data_dir=data_dir,
        image_size=int(data.get("image_size", 224)),
        num_classes=int(num_classes),
        splits=dict(splits),
        cache=bool(data.get("cache", False)),
    )
