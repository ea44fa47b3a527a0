"""Label inference by model completion (Fu et al., USENIX Security 2022).

A party without labels holds a trained bottom part of the model (in a vanilla
split, the client's segment; in a U-shaped one, the server's middle). With a
handful of labelled examples (known_per_class of each class) it completes that
part into a classifier: a small head on the part's outputs, trained while the
part stays frozen ("passive" completion; Fu et al. also fine-tune with
semi-supervised MixMatch, which is not done here). The completed model's
accuracy on other examples is how well the party can infer their labels:
the chance level (1 / classes) means the part tells nothing about labels.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = ["known_examples", "model_completion_attack"]


def known_examples(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Row numbers of `per_class` examples of each class present (sorted)."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    rows = []
    for label in np.unique(labels):
        of_class = np.flatnonzero(labels == label)
        rows.extend(rng.choice(of_class, min(per_class, len(of_class)), False))
    return np.sort(np.asarray(rows, np.int64))


def _features(part, x, batch_size: int = 512) -> np.ndarray:
    """The frozen part's outputs of x, flattened to [examples, features]."""
    out = []
    for first in range(0, len(x), batch_size):
        outputs = tf.nest.flatten(part(x[first : first + batch_size], training=False))
        rows = [
            tf.reshape(tf.cast(o, tf.float32), [tf.shape(o)[0], -1]) for o in outputs
        ]
        out.append(tf.concat(rows, axis=1).numpy())
    return np.concatenate(out)


def model_completion_attack(
    part,
    x_known,
    y_known,
    x_test,
    y_test,
    num_classes: int,
    *,
    hidden: int = 64,
    epochs: int = 200,
    seed: int = 0,
) -> float:
    """Completes `part` with a head trained on the known examples.

    Args:
      part: the party's trained bottom part (a callable Keras model: inputs
        -> its outputs); it is not changed.
      x_known, y_known: the few labelled examples the attacker holds.
      x_test, y_test: examples whose labels it infers (y_test to score).
      num_classes: classes of the task.
      hidden: units of the head's hidden layer.
      epochs: full-batch training epochs of the head (Adam, 1e-3).
      seed: seeds the head's initial weights.

    Returns:
      The completed model's accuracy on x_test.
    """
    known, test = _features(part, x_known), _features(part, x_test)
    # Standardized features: the head trains alike whatever the part's scale.
    mean, std = known.mean(axis=0), known.std(axis=0) + 1e-6
    known, test = (known - mean) / std, (test - mean) / std
    init = keras.initializers.GlorotUniform
    head = keras.Sequential(
        [
            keras.Input((known.shape[1],)),
            keras.layers.Dense(hidden, "relu", kernel_initializer=init(seed)),
            keras.layers.Dense(num_classes, kernel_initializer=init(seed + 1)),
        ]
    )
    _fit(head, known, np.asarray(y_known), epochs)
    predicted = np.argmax(head.predict(test, batch_size=1024, verbose=0), axis=1)
    return float(np.mean(predicted == np.asarray(y_test).reshape(-1)))


def _fit(head, x, y, epochs: int) -> None:
    """Full-batch Adam (1e-3) on the cross-entropy, every epoch in one graph
    (Keras `fit` spends more per epoch than the head's step itself)."""
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(head.trainable_variables)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tf.constant(x, tf.float32), tf.constant(y)

    @tf.function
    def train():
        for _ in tf.range(epochs):
            with tf.GradientTape() as tape:
                value = loss(y, head(x, training=True))
            grads = tape.gradient(value, head.trainable_variables)
            optimizer.apply_gradients(zip(grads, head.trainable_variables))

    train()
