"""Model inversion: an honest-but-curious server decodes cut activations.

The server sees the client's cut activations. If it also holds an auxiliary
set of raw inputs from the same distribution (and can obtain their
activations, for instance by querying the client segment), it can train a
decoder from activations back to inputs and apply it to the activations it
receives during training. How well that decoder does (MSE, SSIM) measures how
much the cut activations leak about the raw inputs.
"""

from __future__ import annotations

import itertools
import os

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "build_decoder",
    "evaluate_reconstruction",
    "grid_image",
    "reconstruction_attack",
    "reconstruction_report",
    "save_grid",
    "train_decoder",
]


def _in_unit_range(x: np.ndarray) -> bool:
    return bool(x.size) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def build_decoder(
    activation_shape,
    input_shape,
    *,
    width: int = 64,
    sigmoid: bool = True,
    seed: int = 0,
) -> keras.Model:
    """A decoder from cut activations of one example to one input.

    Activations of shape ``[h, w, c]`` with an image input ``[H, W, C]`` get a
    convolutional decoder: a 3x3 convolution, stride-2 transposed convolutions
    until the map is at least half the input size, a resize to ``H x W`` and
    two 3x3 convolutions. Any other activations are flattened and decoded by
    two dense layers, then reshaped to the input shape.

    Args:
      activation_shape: the shape of one example's activations (no batch axis).
      input_shape: the shape of one input (no batch axis).
      width: filters of each convolution, or units of each hidden dense layer.
      sigmoid: end with a sigmoid (inputs in [0, 1]); else a linear output.
      seed: seeds the weight initializers.

    Returns:
      An uncompiled `keras.Model` mapping activations to inputs.
    """
    activation_shape, input_shape = tuple(activation_shape), tuple(input_shape)
    seeds = itertools.count(seed)
    out_activation = "sigmoid" if sigmoid else None

    def conv(filters, activation="relu", transpose=False):
        layer = keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
        return layer(
            filters,
            3,
            strides=2 if transpose else 1,
            padding="same",
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        )

    inputs = keras.Input(activation_shape, name="activations")
    if len(activation_shape) == 3 and len(input_shape) == 3:
        (h, w, _), (height, width_px, channels) = activation_shape, input_shape
        y = conv(width)(inputs)
        while 2 * h <= height or 2 * w <= width_px:
            y = conv(width, transpose=True)(y)
            h, w = 2 * h, 2 * w
        y = keras.layers.Resizing(height, width_px, interpolation="bilinear")(y)
        y = conv(width)(y)
        outputs = conv(channels, activation=out_activation)(y)
    else:
        y = keras.layers.Flatten()(inputs)
        size = int(np.prod(input_shape))
        layers = [(width, "relu"), (width, "relu"), (size, out_activation)]
        for units, activation in layers:
            y = keras.layers.Dense(
                units,
                activation,
                kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
            )(y)
        outputs = keras.layers.Reshape(input_shape)(y)
    return keras.Model(inputs, outputs, name="decoder")


def train_decoder(
    activations,
    inputs,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    width: int = 64,
    seed: int = 0,
    verbose: int = 0,
) -> keras.Model:
    """Trains a decoder from the attacker's (activation, input) pairs with MSE.

    The decoder ends with a sigmoid when every input lies in [0, 1].

    Args:
      activations: cut activations, ``[n, ...]``.
      inputs: the matching raw inputs, ``[n, ...]``.
      epochs: passes over the pairs.
      batch_size: pairs per Adam step.
      learning_rate: Adam's learning rate.
      width: decoder width (see `build_decoder`).
      seed: seeds the initializers and the shuffling.
      verbose: Keras ``fit`` verbosity (1 shows a progress bar).

    Returns:
      The trained decoder.

    Raises:
      ValueError: activations and inputs hold different numbers of examples.
    """
    activations = np.asarray(activations, "float32")
    inputs = np.asarray(inputs, "float32")
    if len(activations) != len(inputs) or not len(inputs):
        raise ValueError(
            f"need matching, non-empty pairs: got {len(activations)} activations "
            f"and {len(inputs)} inputs."
        )
    decoder = build_decoder(
        activations.shape[1:],
        inputs.shape[1:],
        width=width,
        sigmoid=_in_unit_range(inputs),
        seed=seed,
    )
    decoder.compile(keras.optimizers.Adam(learning_rate), loss="mse")
    data = (
        tf.data.Dataset.from_tensor_slices((activations, inputs))
        .shuffle(len(inputs), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    decoder.fit(data, epochs=epochs, shuffle=False, verbose=verbose)
    return decoder


def evaluate_reconstruction(decoder, activations, inputs, *, batch_size=256) -> dict:
    """The decoder's mean squared error and mean SSIM on held-out pairs.

    Args:
      decoder: maps activations to inputs (see `train_decoder`).
      activations: held-out cut activations, ``[n, ...]``.
      inputs: the matching raw inputs, ``[n, ...]``.
      batch_size: examples per decoder call.

    Returns:
      ``{"mse": float, "ssim": float}``: the MSE over all values, and the mean
      of ``tf.image.ssim(inputs, reconstructions, max_val=1.0)`` (higher means
      more leakage; 1 is a perfect reconstruction). SSIM needs images
      ``[n, H, W, C]`` (``H, W >= 11``) with values in [0, 1]; for any other
      inputs it is NaN. Reconstructions are clipped to [0, 1] for SSIM only.
    """
    inputs = np.asarray(inputs, "float32")
    recon = decoder.predict(
        np.asarray(activations, "float32"), batch_size=batch_size, verbose=0
    )
    mse = float(np.mean(np.square(recon - inputs)))
    ssim = float("nan")
    if inputs.ndim == 4 and min(inputs.shape[1:3]) >= 11:
        if not _in_unit_range(inputs):
            raise ValueError(
                f"SSIM uses max_val=1.0 but the inputs range over "
                f"[{inputs.min()}, {inputs.max()}]: pass images scaled to [0, 1]."
            )
        clipped = np.clip(recon, 0.0, 1.0)
        ssim = float(tf.reduce_mean(tf.image.ssim(inputs, clipped, max_val=1.0)))
    return {"mse": mse, "ssim": ssim}


def _tile_row(images: np.ndarray, pad: int) -> np.ndarray:
    n, height, width, channels = images.shape
    row = np.ones((height, n * (width + pad) - pad, channels), "float32")
    for i, image in enumerate(images):
        row[:, i * (width + pad) : i * (width + pad) + width] = image
    return row


def grid_image(originals, reconstructions, n: int = 8, *, pad: int = 2):
    """The grid of `save_grid` as a float image ``[height, width, C]`` in [0, 1]
    (for a PNG or a TensorBoard image summary)."""
    originals = np.asarray(originals, "float32")
    reconstructions = np.asarray(reconstructions, "float32")
    if originals.shape != reconstructions.shape or originals.ndim not in (3, 4):
        raise ValueError(
            "save_grid needs two image batches [m, H, W(, C)] of one shape, got "
            f"{originals.shape} and {reconstructions.shape}."
        )
    recons = reconstructions
    if originals.ndim == 3:
        originals, recons = originals[..., None], recons[..., None]
    rows = [_tile_row(np.clip(b[:n], 0.0, 1.0), pad) for b in (originals, recons)]
    spacer = np.ones((pad,) + rows[0].shape[1:], "float32")
    return np.concatenate([rows[0], spacer, rows[1]], axis=0)


def save_grid(
    originals, reconstructions, path: str, n: int = 8, *, pad: int = 2
) -> str:
    """Writes a PNG: ``n`` originals in the top row, reconstructions below.

    Args:
      originals: images ``[m, H, W]`` or ``[m, H, W, C]`` (C = 1 or 3) in [0, 1].
      reconstructions: the matching reconstructions, same shape.
      path: the PNG file to write; missing directories are created.
      n: how many pairs to show (at most ``m``).
      pad: white pixels between images.

    Returns:
      ``path``.

    Raises:
      ValueError: the two batches differ in shape or are not images.
    """
    return _write_png(grid_image(originals, reconstructions, n, pad=pad), path)


def _write_png(grid: np.ndarray, path: str) -> str:
    """Writes a [0, 1] float image as a PNG (directories made); returns path."""
    png = tf.io.encode_png(np.round(grid * 255.0).astype("uint8"))
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tf.io.write_file(path, png)
    return path


def _activations(segment, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The segment's inference-mode outputs for ``x``, in batches."""
    parts = []
    for start in range(0, len(x), batch_size):
        out = segment(x[start : start + batch_size], training=False)
        if isinstance(out, (list, tuple)):
            raise ValueError(
                f"the client segment returns {len(out)} cut tensors; the "
                "reconstruction attack decodes a segment with one output."
            )
        parts.append(keras.ops.convert_to_numpy(out))
    return np.concatenate(parts, axis=0)


def reconstruction_attack(
    client_segment, x_aux, x_eval, *, batch_size: int = 64, **train_kwargs
) -> dict:
    """Trains a decoder on auxiliary data and measures it on held-out inputs.

    Args:
      client_segment: the client's segment, called as
        ``client_segment(x, training=False)``; one cut tensor.
      x_aux: the attacker's auxiliary raw inputs, ``[n, ...]``.
      x_eval: held-out raw inputs whose activations the attacker decodes.
      batch_size: examples per segment call and per decoder training step.
      **train_kwargs: passed on to `train_decoder` (epochs, learning_rate,
        width, seed, verbose).

    Returns:
      ``{"mse": float, "ssim": float, "decoder": keras.Model}`` (see
      `evaluate_reconstruction`).
    """
    x_aux = np.asarray(x_aux, "float32")
    x_eval = np.asarray(x_eval, "float32")
    decoder = train_decoder(
        _activations(client_segment, x_aux, batch_size),
        x_aux,
        batch_size=batch_size,
        **train_kwargs,
    )
    scores = evaluate_reconstruction(
        decoder, _activations(client_segment, x_eval, batch_size), x_eval
    )
    return {**scores, "decoder": decoder}


def reconstruction_report(
    client_segment, x_aux, x_eval, run_dir: str, step: int, **train_kwargs
) -> dict:
    """`reconstruction_attack`, written beside a run.

    Writes `run_dir/reconstructions.png` (the first 8 of `x_eval` over their
    reconstructions) and, in TensorBoard under `run_dir/attacks` at `step`,
    the same grid (`reconstructions`) and `reconstruction_ssim` /
    `reconstruction_mse`.

    Returns:
      `reconstruction_attack`'s dict.
    """
    attack = reconstruction_attack(client_segment, x_aux, x_eval, **train_kwargs)
    originals = np.asarray(x_eval[:8], "float32")
    decoded = attack["decoder"].predict(
        _activations(client_segment, originals, len(originals)), verbose=0
    )
    grid = grid_image(originals, decoded)
    _write_png(grid, os.path.join(run_dir, "reconstructions.png"))
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "attacks"))
    with writer.as_default():
        tf.summary.image("reconstructions", grid[None], step=step)
        tf.summary.scalar("reconstruction_ssim", attack["ssim"], step=step)
        tf.summary.scalar("reconstruction_mse", attack["mse"], step=step)
    writer.close()
    return attack
