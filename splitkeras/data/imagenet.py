"""Streaming ImageNet (ILSVRC-2012) input pipelines over TFDS's TFRecords.

ImageNet does not fit in memory, so unlike `splitkeras.data.pipeline` these
pipelines read the encoded JPEGs from the prepared TFDS dataset and decode
them on the fly, in parallel, with the standard AlexNet/ResNet
preprocessing:

- training: a random crop of 8% to 100% of the image area with an aspect
  ratio in [3/4, 4/3] (`tf.image.decode_and_crop_jpeg` decodes only that
  window), resized to `image_size` x `image_size`, flipped left-right with
  probability 1/2, normalized by `MEAN` and `STD`
  (`splitkeras.data.imagenet_preprocess`);
- evaluation: a centre crop of image_size / (image_size + crop_padding) of
  the shorter side, resized to `image_size`, normalized.

Each client of a split run reads its own disjoint shard of a split
(`num_shards`, `shard_index`). The order of an epoch and every random crop
and flip are drawn from (seed, epoch, shard_index), so a run is reproducible
whatever the thread timing.

ImageNet needs a manual download; nothing here ever downloads. The functions
raise `FileNotFoundError` saying where the tar files go and how to prepare
them if the dataset is not prepared.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from splitkeras.data.imagenet_preprocess import (
    CROP_PADDING,
    preprocess_eval,
    preprocess_train,
)

_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def info(name: str = "imagenet2012", data_dir: str | None = None):
    """Returns the number of classes and the size of each prepared split.

    Args:
      name: TFDS dataset name.
      data_dir: TFDS data directory; None for the TFDS default.

    Returns:
      `(num_classes, {split name: number of examples})`.

    Raises:
      ValueError: If TFDS has no dataset `name`.
      FileNotFoundError: If the dataset is not prepared.
    """
    builder = _prepared_builder(name, data_dir)
    splits = {split: s.num_examples for split, s in builder.info.splits.items()}
    return builder.info.features["label"].num_classes, splits


def train_dataset(
    batch_size: int,
    *,
    data_dir: str | None = None,
    name: str = "imagenet2012",
    split: str = "train",
    image_size: int = 224,
    num_shards: int = 1,
    shard_index: int = 0,
    seed: int | None = 0,
    epoch: int = 0,
    shuffle_buffer: int = 10_000,
    drop_remainder: bool = True,
    examples: tf.data.Dataset | None = None,
) -> tf.data.Dataset:
    """Returns one shuffled, augmented epoch of a client's shard of `split`.

    The shard is `tfds.even_splits(split, num_shards)[shard_index]`: the
    shards are disjoint, cover the split and differ in size by at most one
    example. Its files are read in an order seeded by (seed, epoch,
    shard_index), then examples are shuffled through a buffer of
    `shuffle_buffer` encoded JPEGs (about 110 kB each) with a seed drawn from
    the same triple, and example i of the epoch gets crop and flip seeds
    folded from it and i.

    With an integer `seed` the dataset is deterministic: the same batches in
    every run and on every iteration of the returned dataset. With
    `seed=None` each call draws its own order and crops, and since no order
    is required `tf.data.Options.deterministic` is False: the parallel reads
    and decodes hand on whichever example is ready first instead of waiting
    for the next one in order, which helps when decode times vary.

    Args:
      batch_size: Examples per batch, >= 1.
      data_dir: TFDS data directory; None for the TFDS default.
      name: TFDS dataset name, e.g. 'imagenet2012' or 'imagenet2012_subset'.
      split: Split to read, e.g. 'train' or 'train[:10%]'.
      image_size: Height and width of the output images.
      num_shards: Number of clients the split is divided among, >= 1.
      shard_index: This client's shard, in [0, num_shards).
      seed: Run seed, >= 0, or None for a non-reproducible, faster order.
      epoch: Epoch number, >= 0; each epoch has its own order and crops.
      shuffle_buffer: Encoded examples in the shuffle buffer, >= 1.
      drop_remainder: Whether to drop the last batch if it is smaller.
      examples: This shard's undecoded examples from `shard_examples`, for
        instance cached in memory (`.cache()`) and passed again every epoch
        so that the files are read once; each epoch still shuffles them
        through the buffer and draws its crops from (seed, epoch,
        shard_index). None reads the shard's files, in an order seeded by
        (seed, epoch, shard_index).

    Returns:
      A dataset of (float32 images [batch, image_size, image_size, 3]
      normalized by MEAN and STD, int64 labels [batch]) batches, prefetched.

    Raises:
      ValueError: If an argument is out of range, or TFDS has no dataset
        `name`.
      FileNotFoundError: If the dataset is not prepared.
    """
    _check_positive(batch_size=batch_size, image_size=image_size)
    _check_positive(shuffle_buffer=shuffle_buffer)
    _check_shard(num_shards, shard_index)
    if (seed is not None and seed < 0) or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must both be >= 0.")
    entropy = None if seed is None else [seed, epoch, shard_index]
    file_seed, shuffle_seed, augment_seed = (
        int(s) for s in np.random.SeedSequence(entropy).generate_state(3)
    )
    if seed is None:
        file_seed = shuffle_seed = None
    if examples is None:
        examples = shard_examples(
            data_dir=data_dir,
            name=name,
            split=split,
            num_shards=num_shards,
            shard_index=shard_index,
            file_seed=file_seed,
        )
    examples = examples.shuffle(
        shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
    )
    batches = train_batches(
        examples,
        batch_size,
        image_size=image_size,
        seed=augment_seed,
        drop_remainder=drop_remainder,
    )
    options = tf.data.Options()
    options.deterministic = seed is not None
    return batches.with_options(options)


def shard_examples(
    *,
    data_dir: str | None = None,
    name: str = "imagenet2012",
    split: str = "train",
    num_shards: int = 1,
    shard_index: int = 0,
    file_seed: int | None = None,
) -> tf.data.Dataset:
    """A client's shard of `split` as undecoded `(JPEG bytes, label)` pairs.

    The shard is `tfds.even_splits(split, num_shards)[shard_index]`; its
    files are read in an order drawn from `file_seed` (None: a new order on
    each call). `train_dataset` decodes and augments them.

    Raises:
      ValueError: If the shard is out of range or TFDS has no dataset `name`.
      FileNotFoundError: If the dataset is not prepared.
    """
    _check_shard(num_shards, shard_index)
    builder = _prepared_builder(name, data_dir)
    import tensorflow_datasets as tfds

    shard = tfds.even_splits(split, n=num_shards)[shard_index]
    return _encoded_examples(builder, shard, file_seed, shuffle_files=True)


def eval_dataset(
    batch_size: int,
    *,
    data_dir: str | None = None,
    name: str = "imagenet2012",
    split: str = "validation",
    image_size: int = 224,
    crop_padding: int = CROP_PADDING,
    cache: bool = False,
) -> tf.data.Dataset:
    """Returns centre-cropped `(images, labels)` batches, last one partial.

    The order is fixed: every iteration and every run yields the same
    batches.

    Args:
      batch_size: Examples per batch, >= 1.
      data_dir: TFDS data directory; None for the TFDS default.
      name: TFDS dataset name.
      split: Split to read, e.g. 'validation'.
      image_size: Height and width of the output images.
      crop_padding: The centre crop keeps image_size / (image_size +
        crop_padding) of the shorter side, >= 0.
      cache: Whether to keep the encoded examples in memory after the first
        pass, so evaluating again with the same dataset reads no files.

    Returns:
      A dataset of (float32 images [batch, image_size, image_size, 3]
      normalized by MEAN and STD, int64 labels [batch]) batches, prefetched.

    Raises:
      ValueError: If an argument is out of range, or TFDS has no dataset
        `name`.
      FileNotFoundError: If the dataset is not prepared.
    """
    _check_positive(batch_size=batch_size, image_size=image_size)
    if crop_padding < 0:
        raise ValueError(f"crop_padding={crop_padding} must be >= 0.")
    builder = _prepared_builder(name, data_dir)
    examples = _encoded_examples(builder, split, None, shuffle_files=False)
    if cache:
        examples = examples.cache()
    batches = eval_batches(
        examples, batch_size, image_size=image_size, crop_padding=crop_padding
    )
    options = tf.data.Options()
    options.deterministic = True
    return batches.with_options(options)


def train_batches(
    examples: tf.data.Dataset,
    batch_size: int,
    *,
    image_size: int = 224,
    seed: int = 0,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Decodes, augments and batches `(jpeg bytes, label)` examples.

    The tail of `train_dataset`, for any source of encoded JPEGs. Example i
    gets the per-example seed fold_in([0, seed], i), so its crop and flip do
    not depend on which thread decodes it.

    Args:
      examples: A dataset of (scalar string JPEG, integer label) pairs.
      batch_size: Examples per batch, >= 1.
      image_size: Height and width of the output images.
      seed: Seed of the random crops and flips, in [0, 2**63).
      drop_remainder: Whether to drop the last batch if it is smaller.

    Returns:
      A dataset of (float32 images, int64 labels) batches, prefetched.
    """
    key = tf.constant([0, seed], tf.int64)

    def preprocess(index, example):
        image_bytes, label = example
        example_seed = tf.random.experimental.stateless_fold_in(key, index)
        image = preprocess_train(image_bytes, example_seed, image_size)
        return image, tf.cast(label, tf.int64)

    batches = examples.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    batches = batches.batch(batch_size, drop_remainder=drop_remainder)
    return batches.prefetch(tf.data.AUTOTUNE)


def eval_batches(
    examples: tf.data.Dataset,
    batch_size: int,
    *,
    image_size: int = 224,
    crop_padding: int = CROP_PADDING,
) -> tf.data.Dataset:
    """Decodes, centre-crops and batches `(jpeg bytes, label)` examples.

    Args:
      examples: A dataset of (scalar string JPEG, integer label) pairs.
      batch_size: Examples per batch, >= 1.
      image_size: Height and width of the output images.
      crop_padding: See `eval_dataset`.

    Returns:
      A dataset of (float32 images, int64 labels) batches, the last one
      partial, prefetched.
    """

    def preprocess(image_bytes, label):
        image = preprocess_eval(image_bytes, image_size, crop_padding)
        return image, tf.cast(label, tf.int64)

    batches = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    batches = batches.batch(batch_size)
    return batches.prefetch(tf.data.AUTOTUNE)


def _encoded_examples(builder, split, file_seed, shuffle_files):
    """(JPEG bytes, label) pairs of `split`, undecoded."""
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(
        shuffle_seed=file_seed,
        shuffle_reshuffle_each_iteration=False,
        # Caching is the `cache` argument's decision, not TFDS's.
        try_autocache=False,
    )
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config,
        as_supervised=True,
    )


def _prepared_builder(name, data_dir):
    # Imported here: importing TFDS takes seconds and only these pipelines
    # need it.
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"unknown TFDS dataset {name!r}; use 'imagenet2012' or another "
            "name from tfds.list_builders()."
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(_not_prepared_message(name, data_dir, builder))
    return builder


def _not_prepared_message(name, data_dir, builder) -> str:
    import tensorflow_datasets as tfds

    root = data_dir or tfds.core.constants.DATA_DIR
    root = os.path.expanduser(os.fspath(root))
    manual_dir = os.path.join(root, "downloads", "manual")
    files = " and ".join(_MANUAL_FILES)
    return (
        f"TFDS dataset {name!r} is not prepared in '{builder.data_dir}'. "
        "ImageNet cannot be downloaded automatically: get "
        f"{files} from https://image-net.org/download-images (registration "
        f"required), put them in '{manual_dir}/' and prepare them once (this "
        "reads the tar files and writes TFRecords, about 150 GB, taking "
        "hours):\n"
        '  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\"\n"
        "or, with the TFDS command line (it needs apache-beam installed):\n"
        f"  tfds build {name} --manual_dir={manual_dir} --data_dir={root}"
    )


def _check_shard(num_shards: int, shard_index: int) -> None:
    _check_positive(num_shards=num_shards)
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index={shard_index} must be in [0, num_shards={num_shards})."
        )


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1.")
