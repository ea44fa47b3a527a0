"""In-memory image classification datasets held as numpy arrays."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetArrays:
    """Train and test images and labels of one dataset, held in memory.

    Images keep the dtype they were stored in (usually uint8; the input
    pipeline converts them to float32) and always have a channel axis, so
    28x28 grayscale images are stored as 28x28x1.

    Attributes:
      x_train: Training images, shape (examples, height, width, channels).
      y_train: Training labels, int64, shape (examples,).
      x_test: Test images, same trailing shape and dtype as `x_train`.
      y_test: Test labels, int64, shape (examples,).
      num_classes: Number of classes; every label is in [0, num_classes).
      name: Dataset name, used in logs and error messages.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if x.ndim != 4:
                raise ValueError(
                    f"dataset {self.name!r}: x_{split} has shape {x.shape}; "
                    "expected (examples, height, width, channels). Add a "
                    "channel axis with with_channel_axis()."
                )
            if y.ndim != 1 or y.dtype != np.int64:
                raise ValueError(
                    f"dataset {self.name!r}: y_{split} has shape {y.shape} and "
                    f"dtype {y.dtype}; expected 1-D int64. Convert it with "
                    "as_label_vector()."
                )
            if len(x) != len(y):
                raise ValueError(
                    f"dataset {self.name!r}: {len(x)} images but {len(y)} "
                    f"labels in the {split} split; they must match."
                )
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"dataset {self.name!r}: {split} labels span "
                    f"[{y.min()}, {y.max()}], outside [0, {self.num_classes})."
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: train images are "
                f"{self.x_train.shape[1:]} but test images are "
                f"{self.x_test.shape[1:]}; they must match."
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, without the batch axis, e.g. (28, 28, 1)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        num_classes: int | None = None,
        source: str | None = None,
    ) -> DatasetArrays:
        """Builds a `DatasetArrays` from arrays as files usually store them.

        Grayscale images without a channel axis get one; labels of shape
        (examples,) or (examples, 1) become 1-D int64.

        Args:
          name: Dataset name.
          x_train: Training images, (examples, height, width[, channels]).
          y_train: Training labels, integer, (examples,) or (examples, 1).
          x_test: Test images, like `x_train`.
          y_test: Test labels, like `y_train`.
          num_classes: Number of classes; if None, one more than the largest
            label in either split.
          source: Where the arrays came from, named in error messages;
            defaults to `name`.

        Returns:
          The validated `DatasetArrays`.

        Raises:
          ValueError: If shapes, dtypes or label values are unusable.
        """
        source = source or name
        y_train = as_label_vector(y_train, f"{source} (y_train)")
        y_test = as_label_vector(y_test, f"{source} (y_test)")
        if num_classes is None:
            num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        return cls(
            x_train=with_channel_axis(x_train, f"{source} (x_train)"),
            y_train=y_train,
            x_test=with_channel_axis(x_test, f"{source} (x_test)"),
            y_test=y_test,
            num_classes=num_classes,
            name=name,
        )


def with_channel_axis(images: np.ndarray, source: str) -> np.ndarray:
    """Returns `images` with a trailing channel axis, adding one if needed.

    Args:
      images: (examples, height, width) or (examples, height, width, channels).
      source: Where the images came from, named in error messages.

    Returns:
      A 4-D view of `images` (no copy).

    Raises:
      ValueError: If `images` is neither 3-D nor 4-D.
    """
    if images.ndim == 3:
        return images[..., np.newaxis]
    if images.ndim == 4:
        return images
    raise ValueError(
        f"{source}: images have shape {images.shape}; expected (examples, "
        "height, width) or (examples, height, width, channels)."
    )


def as_label_vector(labels: np.ndarray, source: str) -> np.ndarray:
    """Returns integer class labels as a 1-D int64 array.

    Args:
      labels: Integer labels of shape (examples,) or (examples, 1), as Keras
        stores them.
      source: Where the labels came from, named in error messages.

    Returns:
      The labels, shape (examples,), dtype int64.

    Raises:
      ValueError: If the labels are not integers of one of those shapes, or
        are negative.
    """
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels have shape {labels.shape} and dtype "
            f"{labels.dtype}; expected integer class ids of shape (examples,) "
            "or (examples, 1). Convert one-hot labels with argmax(axis=-1)."
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{source}: labels contain {labels.min()}; must be >= 0.")
    return labels.astype(np.int64, copy=False)
