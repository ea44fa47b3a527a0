"""Datasets read as streams (per epoch, from TFDS files), not numpy arrays.

`imagenet2012` (1.28 M training images) does not fit in memory. A
`StreamingSource` stands where `DatasetArrays` stands for small datasets:
it has a name, an input shape and a class count, and it makes each client's
training stream of an epoch (its disjoint shard of the split, preprocessed
by `splitkeras.data.imagenet`) and the evaluation stream.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
      cache: keep each client's encoded shard in memory after its first
        epoch (later epochs read no files; each still shuffles and crops
        anew), and the evaluation split after its first pass.
      eval_split: the split `eval` reads.
      shuffle_buffer: encoded examples in each client's shuffle buffer.
      drop_remainder: drop each client's last, partial training batch.
    """

    name: str
    data_dir: str | None
    image_size: int
    num_classes: int
    splits: dict
    cache: bool = False
    eval_split: str = "validation"
    shuffle_buffer: int = 10_000
    drop_remainder: bool = True
    _shards: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train(self, batch_size, seed, epoch, shard_index=0, num_shards=1):
        """Client `shard_index`'s stream of one epoch."""
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
            shuffle_buffer=self.shuffle_buffer,
            drop_remainder=self.drop_remainder,
            examples=self._cached_shard(seed, shard_index, num_shards),
        )

    def _cached_shard(self, seed, shard_index, num_shards):
        """The shard's examples cached in memory (built once), or None."""
        if not self.cache:
            return None
        key = (seed, shard_index, num_shards)
        if key not in self._shards:
            from splitkeras.data import imagenet

            file_seed = None
            if seed is not None:  # one file order for every epoch
                entropy = [seed, shard_index, num_shards]
                file_seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
            self._shards[key] = imagenet.shard_examples(
                data_dir=self.data_dir,
                name=self.name,
                num_shards=num_shards,
                shard_index=shard_index,
                file_seed=file_seed,
            ).cache()
        return self._shards[key]

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
        image_size=int(data.image_size),
        num_classes=int(num_classes),
        splits=dict(splits),
        cache=bool(data.cache),
        eval_split=str(data.eval_split),
        shuffle_buffer=int(data.shuffle_buffer),
        drop_remainder=bool(data.drop_remainder),
    )
