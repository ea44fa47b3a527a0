"""Session set-up that must precede any TensorFlow op."""

import pytest
import tensorflow as tf

# Two logical CPU devices, so that tf.distribute tests run a mirrored server on
# this GPU-less machine (tests/distribute). Other tests place ops on CPU:0 as
# before. Logical devices can only be configured before TensorFlow initializes.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(2)]
)


@pytest.fixture(autouse=True)
def _pytest_node(request):
    """Lets a unittest-style test add lines to the run's summary
    (`base.TestCase.record`)."""
    if request.instance is not None:
        request.instance._pytest_node = request.node
    yield


def pytest_terminal_summary(terminalreporter):
    """Prints what tests recorded (`base.TestCase.record`)."""
    lines = [
        value
        for report in terminalreporter.stats.get("passed", [])
        if report.when == "call"
        for name, value in report.user_properties
        if name == "summary"
    ]
    if lines:
        terminalreporter.section("recorded by tests")
        for line in lines:
            terminalreporter.write_line(line)
