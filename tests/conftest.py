"""Session set-up that must precede any TensorFlow op."""

import tensorflow as tf

# Two logical CPU devices, so that tf.distribute tests run a mirrored server on
# this GPU-less machine (tests/distribute). Other tests place ops on CPU:0 as
# before. Logical devices can only be configured before TensorFlow initializes.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(2)]
)
