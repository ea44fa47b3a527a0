"""The standard AlexNet/ResNet preprocessing of one ImageNet JPEG.

Training: a random-resized crop (`AREA_RANGE`, `ASPECT_RATIO_RANGE`, decoded
by `tf.image.decode_and_crop_jpeg`), a left-right flip, normalization.
Evaluation: a centre crop, normalization. Both are stateless: the same seed
gives the same image. The pipelines around them are
`splitkeras.data.imagenet`.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "AREA_RANGE",
    "ASPECT_RATIO_RANGE",
    "CROP_PADDING",
    "MAX_ATTEMPTS",
    "MEAN",
    "STD",
    "normalize",
    "preprocess_eval",
    "preprocess_train",
]

# Per-channel mean and standard deviation of ImageNet's training images,
# RGB, on the [0, 1] scale.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Evaluation crops image_size / (image_size + CROP_PADDING) of the shorter
# side: 224 of 256.
CROP_PADDING = 32
# Random-resized-crop ranges: the share of the image area kept and the
# crop's width / height.
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# Crops drawn before falling back to a centre crop.
MAX_ATTEMPTS = 10


def preprocess_train(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    image_size: int = 224,
    crop_padding: int = CROP_PADDING,
) -> tf.Tensor:
    """Random-resized crop, flip and normalization of one JPEG.

    The crop is drawn with `tf.image.stateless_sample_distorted_bounding_box`
    over the whole image (AREA_RANGE, ASPECT_RATIO_RANGE, MAX_ATTEMPTS);
    when no attempt fits, the centre crop of `preprocess_eval` is used.

    Args:
      image_bytes: Scalar string tensor, a JPEG image.
      seed: Shape [2] integer tensor; the same seed gives the same output.
      image_size: Height and width of the output image.
      crop_padding: Padding of the fallback centre crop.

    Returns:
      float32 [image_size, image_size, 3], normalized by MEAN and STD.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed))
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed,
        # 0 so that AREA_RANGE alone bounds the crop (the default of 0.1
        # would raise its lower end to 10% of the image).
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    # After MAX_ATTEMPTS misses the sampler returns the whole image.
    missed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    window = tf.where(missed, _centre_window(shape, image_size, crop_padding), window)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return normalize(image)


def preprocess_eval(
    image_bytes: tf.Tensor,
    image_size: int = 224,
    crop_padding: int = CROP_PADDING,
) -> tf.Tensor:
    """Centre crop, resize and normalization of one JPEG.

    Args:
      image_bytes: Scalar string tensor, a JPEG image.
      image_size: Height and width of the output image.
      crop_padding: The crop keeps image_size / (image_size + crop_padding)
        of the shorter side.

    Returns:
      float32 [image_size, image_size, 3], normalized by MEAN and STD.
    """
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = _centre_window(shape, image_size, crop_padding)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return normalize(image)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Maps [0, 255] RGB values to (value / 255 - MEAN) / STD, float32."""
    scale = tf.constant([1 / (255 * s) for s in STD], tf.float32)
    shift = tf.constant([m / s for m, s in zip(MEAN, STD)], tf.float32)
    return tf.cast(image, tf.float32) * scale - shift


def _centre_window(shape, image_size, crop_padding):
    """[top, left, side, side] of the centre square decode window."""
    height, width = shape[0], shape[1]
    fraction = image_size / (image_size + crop_padding)
    shorter = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.maximum(tf.cast(fraction * shorter, tf.int32), 1)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])
