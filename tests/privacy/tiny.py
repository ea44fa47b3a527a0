"""The tiny LeNet run the privacy tests train end to end."""

import os

from splitkeras.cli import set_fields
from splitkeras.configs import fashion_mnist_lenet
from tests.test_experiment import _write_npz


def tiny_lenet(root, **fields):
    """The LeNet config on a tiny dataset written under `root`, with each
    dotted field of `fields` set ({"train.epochs": 1, ...})."""
    c = fashion_mnist_lenet.get_config()
    c.data.path = _write_npz(os.path.join(root, "tiny.npz"))
    set_fields(c, fields)
    return c
