"""splitkeras: split learning for TensorFlow 2 / Keras 3."""
